"""Our training and sampling speed against the seed's way, on one config and one machine.

    python benchmarks/bench_baselines.py [--steps 3] [--new-tokens 64,256]

Config "bench-201k" (configs/bench_201k.py), float32 everywhere, one process. Training: our
jitted train step at 1 x 256 and BATCH x 256 tokens per step, against OpenAI's reference torch
Transformer trained as the seed trains it: one 256-token sequence per step, AdamW, 2 threads.
Both start from the same weights and see the same tokens. Sampling, batch 1 after a 16-token
prompt, top-k 50: our `generate` (KV cache, one jitted loop) against the seed's sampler, which
re-runs the reference on the whole sequence for every new token. Every figure is measured in
full after a warm-up; none is extrapolated. Several minutes on an idle 2-core CPU, most of it the
torch sampler's 256 tokens; the load average printed before and after says how idle it was.
"""

if __name__ == "__main__":  # first, before the heavy imports: it may restart the process
  from nanogptoss_jax.cpu_malloc import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()

import argparse
import dataclasses
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from gpt_oss.torch.model import ModelConfig, Transformer

from nanogptoss_jax.training.state import abstract_train_state, init_train_state
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.interop.torch_reference import to_torch_state_dict
from nanogptoss_jax.model.registry import build_model
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.training.step import make_train_step

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "bench_201k.py"
CONTEXT_LEN = 256  # tokens per training sequence, for both
BATCH = 8  # our batched step: BATCH sequences of CONTEXT_LEN tokens
TORCH_THREADS = 2  # the seed's setting on this 2-core machine
PROMPT_LENGTH, TOP_K = 16, 50  # the seed's sampler benchmark
WARMUP_STEPS = 1  # untimed steps first: ours compiles, torch warms its allocator
SAMPLE_REPEATS = 2  # our sampling: median of this many; the torch loop runs once (a minute)
SEED = 0


def bench_config() -> RunConfig:
  """bench-201k in float32 (storage and compute), 256-token sequences."""
  cfg = load_config_file(CONFIG)
  execution = cfg.execution.replace(dtype="float32", param_dtype="float32")
  return dataclasses.replace(cfg, execution=execution,
                             train=dataclasses.replace(cfg.train, context_len=CONTEXT_LEN))


def reference_model(cfg: RunConfig, weights: dict[str, np.ndarray]) -> Transformer:
  """OpenAI's reference Transformer holding `weights` (reference names and layouts), float32."""
  fields = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(ModelConfig)}
  reference = Transformer(ModelConfig(**fields)).float()  # created bf16 and uninitialised
  with torch.no_grad():
    for name, param in reference.named_parameters():
      param.copy_(torch.tensor(weights[name]))
  return reference


def random_tokens(cfg: RunConfig, shape: tuple[int, ...]) -> np.ndarray:
  """Token ids; speed does not depend on the text."""
  return np.random.default_rng(SEED).integers(0, cfg.model.vocab_size, shape, dtype=np.int64)


def timed(fn, steps: int) -> tuple[float, object]:
  """(median seconds of `steps` timed calls after WARMUP_STEPS untimed ones, last result)."""
  for _ in range(WARMUP_STEPS):
    result = fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    result = fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), result


def ours_train(cfg: RunConfig, tokens: np.ndarray, steps: int) -> tuple[float, float]:
  """(tokens/s, first step's loss) of our jitted step on tokens [B, T + 1], fresh weights."""
  graphdef, _, tx = abstract_train_state(cfg)
  # Seeded as the weights copied into the reference; donated away by the step, so built here.
  state = {"state": init_train_state(build_model(cfg.model, SEED, cfg.execution), tx)}
  step_fn = jax.jit(make_train_step(graphdef, cfg, tx), donate_argnums=0)
  batch = jnp.asarray(tokens[None], jnp.int32)  # [accum=1, B, T + 1]
  losses = []

  def step():
    state["state"], metrics = step_fn(state["state"], batch)
    losses.append(float(metrics["loss"]))  # a device fetch: the step is finished when timed

  seconds, _ = timed(step, steps)
  return tokens.shape[0] * CONTEXT_LEN / seconds, losses[0]


def torch_train(cfg: RunConfig, weights: dict, sequence: np.ndarray,
                steps: int) -> tuple[float, float]:
  """(tokens/s, first step's loss) of the seed's step: one sequence [T + 1], AdamW, clipping."""
  reference = reference_model(cfg, weights).train()
  optim = cfg.optim
  optimizer = torch.optim.AdamW(reference.parameters(), lr=optim.lr,
                                betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                weight_decay=optim.weight_decay)
  inputs, targets = torch.from_numpy(sequence[:-1]), torch.from_numpy(sequence[1:])
  losses = []

  def step():
    loss = torch.nn.functional.cross_entropy(reference(inputs), targets)  # logits [T, V]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), optim.grad_clip)  # as ours does
    optimizer.step()
    losses.append(loss.item())

  seconds, _ = timed(step, steps)
  return CONTEXT_LEN / seconds, losses[0]


def ours_sample(model, prompt: list[int], new_tokens: int) -> float:
  """New tokens/s of our generate, batch 1, top-k 50, exactly new_tokens (no stop tokens)."""
  run = lambda: generate(model, [prompt], new_tokens, temperature=1.0, top_k=TOP_K, seed=SEED,
                         stop_tokens=())
  seconds, _ = timed(run, SAMPLE_REPEATS)
  return new_tokens / seconds


def torch_sample(reference: Transformer, prompt: list[int], new_tokens: int) -> float:
  """New tokens/s of the seed's sampler: a full forward per new token, then top-k 50."""
  generator = torch.Generator().manual_seed(SEED)

  @torch.no_grad()
  def run():
    tokens = torch.tensor(prompt)
    for _ in range(new_tokens):
      values, indices = torch.topk(reference(tokens)[-1], TOP_K)  # the last position's logits
      choice = torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator)
      tokens = torch.cat([tokens, indices[choice]])
    return tokens

  with torch.no_grad():
    reference(torch.tensor(prompt))  # warm-up: first-call allocations
  start = time.perf_counter()
  run()
  return new_tokens / (time.perf_counter() - start)


def load_line() -> str:
  return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def print_table(rows: list[tuple[str, float, float]]) -> None:
  print("| measurement (bench-201k, float32) | ours (JAX) tokens/s | seed's way (torch) tokens/s "
        "| ours / seed's |")
  print("|---|---:|---:|---:|")
  for label, ours, theirs in rows:
    print(f"| {label} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.1f}x |")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="timed training steps per setting")
  parser.add_argument("--new-tokens", default="64,256", help="sampling lengths, comma-separated")
  args = parser.parse_args()
  lengths = [int(n) for n in args.new_tokens.split(",")]
  torch.set_num_threads(TORCH_THREADS)
  print(f"jax {jax.__version__} backend {jax.default_backend()} ({jax.device_count()} device); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {os.cpu_count()} CPUs; "
        f"{load_line()}", flush=True)

  cfg = bench_config()
  model = build_model(cfg.model, SEED, cfg.execution)
  weights = to_torch_state_dict(model)
  print(f"bench-201k: {sum(w.size for w in weights.values()) / 1e6:.1f}M parameters; same "
        "weights in both", flush=True)

  # Sampling first: training below changes (and donates) the weights.
  prompt = random_tokens(cfg, (PROMPT_LENGTH,)).tolist()
  reference = reference_model(cfg, weights).eval()
  rows = []
  for new_tokens in lengths:
    ours = ours_sample(model, prompt, new_tokens)
    theirs = torch_sample(reference, prompt, new_tokens)
    print(f"  sampling {new_tokens} new tokens: ours {ours:.1f}, seed's way {theirs:.2f} tokens/s",
          flush=True)
    rows.append((f"sampling, batch 1, {new_tokens} new after {PROMPT_LENGTH}, top-k {TOP_K}",
                 ours, theirs))
  del reference, model

  sequences = random_tokens(cfg, (BATCH, CONTEXT_LEN + 1))
  theirs, torch_loss = torch_train(cfg, weights, sequences[0], args.steps)
  print(f"  torch train: {theirs:.1f} tokens/s", flush=True)
  ours_one, ours_loss = ours_train(cfg, sequences[:1], args.steps)
  print(f"  our train, 1 x {CONTEXT_LEN}: {ours_one:.1f} tokens/s", flush=True)
  ours_batched, _ = ours_train(cfg, sequences, args.steps)
  print(f"  our train, {BATCH} x {CONTEXT_LEN}: {ours_batched:.1f} tokens/s", flush=True)
  rows[:0] = [(f"training, ours 1 x {CONTEXT_LEN} vs torch 1 x {CONTEXT_LEN} per step",
               ours_one, theirs),
              (f"training, ours {BATCH} x {CONTEXT_LEN} vs torch 1 x {CONTEXT_LEN} per step",
               ours_batched, theirs)]
  print()
  print_table(rows)
  # Same weights and the same first sequence, so the two first-step losses must agree.
  print(f"\nfirst-step loss on the same sequence: ours {ours_loss:.5f}, reference "
        f"{torch_loss:.5f}; training timed as the median of {args.steps} steps after "
        f"{WARMUP_STEPS} warm-up; our sampling the median of {SAMPLE_REPEATS} after a warm-up, "
        f"torch sampling one full run; {load_line()}")


if __name__ == "__main__":
  main()
