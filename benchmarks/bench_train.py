"""Training throughput and MFU of the jitted train step on this machine.

    python benchmarks/bench_train.py [--steps 5] [--configs nano,bench_201k,bench_201k_compact]

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


def bench(name: str, steps: int, batch_size: int | None, grad_accum: int | None,
          layers_impl: str | None = None, lora_rank: int = 0) -> dict:
  cfg = load(name)
  if lora_rank:  # LoRA r on q, k, v, o and the experts; only the adapters train
    cfg = dataclasses.replace(cfg, lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank))
  if layers_impl:
    cfg = dataclasses.replace(cfg, execution=cfg.execution.replace(layers_impl=layers_impl))
  overrides = {"batch_size": batch_size, "grad_accum": grad_accum}
  overrides = {key: value for key, value in overrides.items() if value}
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
  train = cfg.train
  graphdef, _, tx = abstract_train_state(cfg)
  state = jax.jit(lambda: init_train_state(run_model(cfg), tx, trainable_pattern(cfg)))()
  step_fn = jax.jit(make_train_step(graphdef, cfg, tx), donate_argnums=0)
  rng = np.random.default_rng(0)
  shape = (train.grad_accum, train.batch_size // train.grad_accum, train.context_len + 1)
  batch = jnp.asarray(rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32))
  start = time.perf_counter()
  state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  step_s = float(np.median(times))
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--configs", default="nano,bench_201k,bench_201k_compact")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
  parser.add_argument("--grad-accum", type=int, default=None, help="override train.grad_accum")
  parser.add_argument("--layers-impl", default=None, help="override execution.layers_impl (loop, scan)")
  parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank")
  args = parser.parse_args()
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
