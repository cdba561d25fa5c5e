"""Training throughput and MFU of the jitted train step on this machine.

    python benchmarks/bench_train.py [--steps 5] [--configs nano,bench_201k,bench_201k_compact]
    python benchmarks/bench_train.py --paired-lora-rank 8 --rounds 3 --configs nano,small

The second form times a full fine-tuning step and a LoRA step of each config in turns (full,
LoRA, LoRA, full, ...) in one process, so a shared machine's drifting speed falls on both alike.

MFU = model FLOPs per second (matmuls of forward + backward, `nanogptoss_jax.flops`) divided by
this machine's float32 matmul peak, measured in the same run. Random tokens: speed does not
depend on the data.
"""

if __name__ == "__main__":  # first, before the heavy imports: it may restart the process
  from nanogptoss_jax.cpu_malloc import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()

import argparse
import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanogptoss_jax.model.lora import LoraConfig
from nanogptoss_jax.training.state import (abstract_train_state, init_train_state, run_model,
                                           trainable_pattern)
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.experiments.timing import measure_matmul_peak
from nanogptoss_jax.model.flops import train_flops_per_token
from nanogptoss_jax.training.step import make_train_step

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
COMPACT_VOCAB = 8192  # bench_201k_compact: the same model with a TinyStories-sized vocabulary


def load(name: str):
  if name == "bench_201k_compact":
    cfg = load_config_file(CONFIGS / "bench_201k.py")
    return dataclasses.replace(cfg, model=cfg.model.replace(vocab_size=COMPACT_VOCAB))
  return load_config_file(CONFIGS / f"{name}.py")


def run_config(name: str, batch_size: int | None, grad_accum: int | None,
               layers_impl: str | None = None, lora_rank: int = 0):
  """The named config with the command line's overrides."""
  cfg = load(name)
  if lora_rank:  # LoRA r on q, k, v, o and the experts; only the adapters train
    cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank))
  if layers_impl:
    cfg = dataclasses.replace(cfg, execution=cfg.execution.replace(layers_impl=layers_impl))
  overrides = {"batch_size": batch_size, "grad_accum": grad_accum}
  overrides = {key: value for key, value in overrides.items() if value}
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))


class Stepper:
  """A config's jitted train step, its state and one random batch; compiled on construction."""

  def __init__(self, cfg):
    train = cfg.train
    graphdef, _, tx = abstract_train_state(cfg)
    self.state = jax.jit(lambda: init_train_state(run_model(cfg), tx, trainable_pattern(cfg)))()
    self.step_fn = jax.jit(make_train_step(graphdef, cfg, tx), donate_argnums=0)
    rng = np.random.default_rng(0)
    shape = (train.grad_accum, train.batch_size // train.grad_accum, train.context_len + 1)
    self.batch = jnp.asarray(rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32))
    self.tokens = train.batch_size * train.context_len
    self.compile_s = self.run(1)[0]

  def run(self, steps: int) -> list[float]:
    """Seconds of each of `steps` steps, each waited for."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, self.metrics = self.step_fn(self.state, self.batch)
      jax.block_until_ready(self.metrics)
      times.append(time.perf_counter() - start)
    return times


def bench(name: str, steps: int, batch_size: int | None, grad_accum: int | None,
          layers_impl: str | None = None, lora_rank: int = 0) -> dict:
  cfg = run_config(name, batch_size, grad_accum, layers_impl, lora_rank)
  train = cfg.train
  stepper = Stepper(cfg)
  compile_s = stepper.compile_s
  step_s = float(np.median(stepper.run(steps)))
  metrics = stepper.metrics
  tokens = train.batch_size * train.context_len
  # A full step's FLOPs; with LoRA the frozen weights get no gradient (about 2/3 of these), so
  # its MFU reads high: compare LoRA with full training by tokens/s.
  flops = train_flops_per_token(cfg.model, train.context_len) * tokens
  stats = jax.devices()[0].memory_stats() or {}  # None on the CPU
  print(f"{name}: peak device memory {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB",
        flush=True)
  name += f" LoRA r{lora_rank}" if lora_rank else ""
  return {"config": name, "tokens/step": tokens, "step s": step_s, "tokens/s": tokens / step_s,
          "GFLOP/step": flops / 1e9, "model FLOP/s": flops / step_s, "compile s": compile_s,
          "loss": float(metrics["loss"])}


def paired_lora(name: str, rank: int, rounds: int, steps: int, batch_size: int | None,
                grad_accum: int | None, layers_impl: str | None = None) -> dict:
  """Median tokens/s of a full and a LoRA-r step of one config, timed in alternating rounds
  (ABBA order), and the median over rounds of LoRA's speed-up in the same round."""
  full = Stepper(run_config(name, batch_size, grad_accum, layers_impl))
  lora = Stepper(run_config(name, batch_size, grad_accum, layers_impl, rank))
  rates = {"full": [], "lora": []}
  for round_index in range(rounds):
    order = (("full", full), ("lora", lora))
    for key, stepper in order if round_index % 2 == 0 else order[::-1]:
      rates[key].append(stepper.tokens / float(np.median(stepper.run(steps))))
  ratios = [b / a for a, b in zip(rates["full"], rates["lora"])]
  return {"config": name, "tokens/step": full.tokens, "rounds": rounds,
          "full tokens/s": float(np.median(rates["full"])),
          "lora tokens/s": float(np.median(rates["lora"])),
          "ratio": float(np.median(ratios)), "ratio range": (min(ratios), max(ratios)),
          "full all": rates["full"], "lora all": rates["lora"]}


def print_paired(rows: list[dict], rank: int) -> None:
  print(f"| config | tokens/step | full tokens/s | LoRA r{rank} tokens/s | LoRA / full "
        "(median of rounds, range) |")
  print("|---|---|---|---|---|")
  for row in rows:
    low, high = row["ratio range"]
    print(f"| {row['config']} | {row['tokens/step']} | {row['full tokens/s']:,.0f} | "
          f"{row['lora tokens/s']:,.0f} | {row['ratio']:.2f}× ({low:.2f}–{high:.2f}) |")
  for row in rows:
    print(f"{row['config']} per round: full " + ", ".join(f"{r:,.0f}" for r in row["full all"])
          + "; LoRA " + ", ".join(f"{r:,.0f}" for r in row["lora all"]))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--configs", default="nano,bench_201k,bench_201k_compact")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
  parser.add_argument("--grad-accum", type=int, default=None, help="override train.grad_accum")
  parser.add_argument("--layers-impl", default=None, help="override execution.layers_impl (loop, scan)")
  parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank")
  parser.add_argument("--paired-lora-rank", type=int, default=0,
                      help="time full and LoRA-r steps of each config in alternating rounds")
  parser.add_argument("--rounds", type=int, default=3, help="rounds of --paired-lora-rank")
  args = parser.parse_args()
  if args.paired_lora_rank:
    rows = [paired_lora(name, args.paired_lora_rank, args.rounds, args.steps, args.batch_size,
                        args.grad_accum, args.layers_impl) for name in args.configs.split(",")]
    print_paired(rows, args.paired_lora_rank)
    return
  # The peak is measured before and after every config and the highest kept: one measurement
  # taken in a slow minute of a shared machine would understate it and flatter the MFU.
  peaks = [measure_matmul_peak()]
  rows = []
  for name in args.configs.split(","):
    rows.append(bench(name, args.steps, args.batch_size, args.grad_accum, args.layers_impl,
                      args.lora_rank))
    peaks.append(measure_matmul_peak())
  peak = max(peaks)
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); f32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s (2048^3, the best of {len(peaks)} measurements of 10 runs, "
        f"{min(peaks) / 1e9:.1f}-{peak / 1e9:.1f})")
  for row in rows:
    row["MFU"] = row["model FLOP/s"] / peak
  header = ["config", "tokens/step", "step s", "tokens/s", "GFLOP/step", "MFU", "compile s"]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for row in rows:
    cells = [row["config"], str(row["tokens/step"]), f"{row['step s']:.3f}",
             f"{row['tokens/s']:,.0f}", f"{row['GFLOP/step']:.1f}", f"{row['MFU']:.1%}",
             f"{row['compile s']:.1f}"]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
