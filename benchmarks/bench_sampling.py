"""Sampling speed on the "bench-201k" config (float32, random init): decode tokens/s at batch 1
and 8, time to first token, per-token time deep into the context, a seed-style full-recompute
baseline, and how close batch-1 decode gets to the memory-bandwidth bound.

Usage (from the repository root):
    python -m benchmarks.bench_sampling [--new-tokens 256] [--skip-deep] [--skip-baseline]
"""

if __name__ == "__main__":  # first, before the heavy imports: it may restart the process
  from nanogptoss_jax.cpu_malloc import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.experiments import timing
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.sampling.decode import generate

BENCH_201K = GptOssConfig(
    num_hidden_layers=4, hidden_size=256, intermediate_size=256, head_dim=64,
    num_attention_heads=4, num_key_value_heads=2, num_experts=4, experts_per_token=2,
    sliding_window=128, vocab_size=201088, rope_scaling_factor=1.0)
PROMPT_LENGTH = 16
DECODE_BATCHES = (1, 8)
DEEP_POSITIONS = (128, 512, 1024)
DEEP_NEW_TOKENS = 33  # the first comes with the prefill; 32 more time the steps
SEED_NEW_TOKENS, SEED_TOP_K = 64, 50  # the seed's sampler benchmark: 64 new after 16, top-k 50
SEED_TOKENS_PER_S = 8.2  # the seed's float32 torch sampler on this CPU (shared/ENVIRONMENT.md)
COPY_MEGABYTES = 512
READ_ROWS = 256  # the matrix-vector read has the unembedding's layout: [256] @ [256, columns]
REPEATS = 3  # timings are the best of this many runs (the machine is shared)
FLOAT32_BYTES = 4


def best_time(fn, repeats=REPEATS) -> float:
  """Lowest wall time of fn() over `repeats` runs (after one untimed warm-up run)."""
  return timing.best_time(fn, repeats)


def random_prompts(batch: int, length: int, seed: int = 0) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return rng.integers(0, BENCH_201K.vocab_size - 1000, (batch, length)).tolist()


def decode_throughput(model, batch: int, new_tokens: int) -> tuple[float, float, float]:
  """(tokens/s over the whole call, tokens/s of the decode loop alone, time to first token)."""
  prompts = random_prompts(batch, PROMPT_LENGTH)
  total = best_time(lambda: generate(model, prompts, new_tokens, stop_tokens=[]))
  first = first_token_time(model, prompts)
  # Every step after the first is one pass of the compiled loop body.
  return batch * new_tokens / total, batch * (new_tokens - 1) / (total - first), first


def first_token_time(model, prompts) -> float:
  """Prompt in, first new token out (prefill + one decode step), compiled."""
  return best_time(lambda: generate(model, prompts, 1, stop_tokens=[]))


def deep_token_time(model, position: int) -> tuple[float, float]:
  """(time to first token, seconds per token) for a prompt of `position` tokens."""
  prompts = random_prompts(1, position)
  stamps = []
  run = lambda: (stamps.clear(),
                 generate(model, prompts, DEEP_NEW_TOKENS, stop_tokens=[],
                          callback=lambda _: stamps.append(time.perf_counter())))
  start = time.perf_counter()
  run()  # compile
  best_first, best_step = math.inf, math.inf
  for _ in range(REPEATS):
    start = time.perf_counter()
    run()
    # Streaming reports a 1-token chunk first, then chunks of 8: time whole chunks only.
    best_first = min(best_first, stamps[0] - start)
    best_step = min(best_step, (stamps[-1] - stamps[0]) / (len(stamps) - 1))
  return best_first, best_step


def seed_style_tokens_per_s(model) -> float:
  """The seed's sampler: a full forward over the whole sequence for each new token, top-k 50.

  Jitted per length and warmed up first, so this is kinder than the eager torch seed.
  """
  graphdef, params = nnx.split(model)

  @jax.jit
  def next_token(params, tokens, key):
    logits = nnx.merge(graphdef, params)(tokens)[:, -1]  # [1, V]
    values, indices = jax.lax.top_k(logits, SEED_TOP_K)
    choice = jax.random.categorical(key, values, axis=-1)
    return jnp.take_along_axis(indices, choice[:, None], axis=-1)  # [1, 1]

  prompt = jnp.asarray(random_prompts(1, PROMPT_LENGTH))
  key = jax.random.key(0)

  def run():
    tokens = prompt
    for step in range(SEED_NEW_TOKENS):
      token = next_token(params, tokens, jax.random.fold_in(key, step))
      tokens = jnp.concatenate([tokens, token], axis=1)
    return tokens.block_until_ready()

  print(f"  compiling the baseline for {SEED_NEW_TOKENS} lengths...", flush=True)
  return SEED_NEW_TOKENS / best_time(run, repeats=1)


def memory_bandwidth() -> tuple[float, float]:
  """(copy GB/s counting read + write, matrix-vector read GB/s) over COPY_MEGABYTES, jitted.

  The copy is the bound's figure. The read streams the same bytes through XLA's
  matrix-vector kernel, which runs on one thread here: the speed a batch-1 unembedding can get.
  """
  x = jnp.ones((COPY_MEGABYTES * 2**20 // FLOAT32_BYTES,), jnp.float32)
  # Donated, so the copy writes into recycled memory instead of freshly mapped pages.
  copy = jax.jit(lambda x: x + 1, donate_argnums=0)  # x + 0 would be simplified away
  state = {"x": x}
  def run_copy():
    state["x"] = copy(state["x"]).block_until_ready()
  copy_s = best_time(run_copy)
  matrix = state["x"].reshape(READ_ROWS, -1)
  read = jax.jit(lambda m: jnp.ones((READ_ROWS,), m.dtype) @ m)
  read_s = best_time(lambda: read(matrix).block_until_ready())
  return 2 * x.nbytes / copy_s / 1e9, x.nbytes / read_s / 1e9


def bytes_per_step(model, position: int) -> tuple[int, int]:
  """(weight bytes, cache bytes) one batch-1 decode step must read at least once.

  The embedding is a gather (one row); every other weight is needed, except that only
  experts_per_token of the num_experts expert matrices serve a single token.
  """
  cfg = BENCH_201K
  weights = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size = leaf[...].size
    if path[0] == "embedding":
      size = cfg.hidden_size
    elif any(str(p).startswith("mlp") and ("weight" in str(p) or "bias" in str(p)) for p in path):
      size = size * cfg.experts_per_token // cfg.num_experts
    weights += size * FLOAT32_BYTES
  kv_per_position = 2 * cfg.num_key_value_heads * cfg.head_dim * FLOAT32_BYTES  # k and v
  cache = sum(min(cfg.layer_window(layer) or position, position)
              for layer in range(cfg.num_hidden_layers)) * kv_per_position
  return weights, cache


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--skip-baseline", action="store_true")
  parser.add_argument("--skip-deep", action="store_true")
  args = parser.parse_args()

  print(f"devices: {jax.devices()}; building bench-201k (float32, random init)...", flush=True)
  model = GptOss(BENCH_201K, rngs=nnx.Rngs(0))
  params = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(f"  {params / 1e6:.1f}M parameters")

  # The machine may be shared: every number below scales with the CPU left to this process.
  print("load average (1, 5, 15 min): %.1f %.1f %.1f on %d cores"
        % (*os.getloadavg(), os.cpu_count()))
  # Bandwidth is measured around the batch-1 run and the higher figure kept: the strictest bound.
  bandwidths = [memory_bandwidth()]
  results = {}
  for batch in DECODE_BATCHES:
    overall, loop, first = decode_throughput(model, batch, args.new_tokens)
    results[batch] = loop
    print(f"batch {batch}: {args.new_tokens} new tokens after {PROMPT_LENGTH}: "
          f"{overall:7.1f} tokens/s overall, {loop:7.1f} tokens/s in the decode loop "
          f"({1e3 * batch / loop:.2f} ms per step); first token {1e3 * first:.1f} ms",
          flush=True)
    if batch == 1:
      bandwidths.append(memory_bandwidth())
  print(f"batch 8 / batch 1 decode tokens/s: {results[8] / results[1]:.2f}x (target >= 5x)")

  if not args.skip_deep:
    for position in DEEP_POSITIONS:
      first, step = deep_token_time(model, position)
      print(f"prompt {position:5d}: first token {1e3 * first:7.1f} ms, "
            f"then {1e3 * step:6.2f} ms per token (positions {position}..{position + 32})",
            flush=True)

  copy_gbs, read_gbs = (max(values) for values in zip(*bandwidths))
  bandwidth = copy_gbs
  position = PROMPT_LENGTH + args.new_tokens // 2  # the average position of the timed run
  weights, cache = bytes_per_step(model, position)
  bound = bandwidth * 1e9 / (weights + cache)
  print(f"memory bandwidth: copy {copy_gbs:.1f} GB/s (read + write), one-thread matrix-vector "
        f"read {read_gbs:.1f} GB/s; "
        f"a batch-1 step reads >= {weights / 1e6:.1f} MB of weights + {cache / 1e6:.2f} MB of "
        f"cache -> bound {bound:.1f} tokens/s at {bandwidth:.1f} GB/s")
  streamed = results[1] * (weights + cache) / 1e9
  print(f"batch-1 decode at {results[1] / bound:.0%} of the bandwidth bound (target >= 70%): "
        f"it streams >= {streamed:.1f} GB/s, {streamed / read_gbs:.0%} of the one-thread read")

  print("load average (1, 5, 15 min): %.1f %.1f %.1f" % os.getloadavg())
  if not args.skip_baseline:
    seed_style = seed_style_tokens_per_s(model)
    print(f"seed-style full recompute (jitted per length, {SEED_NEW_TOKENS} new after "
          f"{PROMPT_LENGTH}, top-k {SEED_TOP_K}): {seed_style:.1f} tokens/s")
    print(f"speedup at batch 1: {results[1] / seed_style:.1f}x over the seed-style baseline, "
          f"{results[1] / SEED_TOKENS_PER_S:.1f}x over the seed's measured "
          f"{SEED_TOKENS_PER_S} tokens/s (target >= 20x)")


if __name__ == "__main__":
  main()
