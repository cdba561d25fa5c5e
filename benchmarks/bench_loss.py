"""Paired in-process A/B of the unembedding loss + gradient: fused vs chunked (vs plain).

  python benchmarks/bench_loss.py [--tokens 1024] [--vocab 201088] [--impls fused,chunked]

Default shape: one bench_201k micro-batch (4 x 256 tokens, width 256, the full vocabulary).
Implementations alternate round by round; prints median seconds and the ratio to the first.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanogptoss_jax.model.unembedding import CROSS_ENTROPY


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=1024)
  parser.add_argument("--width", type=int, default=256)
  parser.add_argument("--vocab", type=int, default=201088)
  parser.add_argument("--impls", default="fused,chunked")
  parser.add_argument("--rounds", type=int, default=8)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(args.tokens, args.width)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(args.width, args.vocab)) * 0.02, jnp.float32)
  labels = jnp.asarray(rng.integers(0, args.vocab, args.tokens), jnp.int32)
  fns = {name: jax.jit(jax.value_and_grad(
      lambda h, w, fn=CROSS_ENTROPY[name]: fn(h, w, labels).mean(), argnums=(0, 1)))
         for name in args.impls.split(",")}
  times = {name: [] for name in fns}
  for fn in fns.values():
    jax.block_until_ready(fn(hidden, kernel))
  for _ in range(args.rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(hidden, kernel))
      times[name].append(time.perf_counter() - start)
  first = np.median(next(iter(times.values())))
  for name, t in times.items():
    print(f"{name:8s} {np.median(t):7.3f} s  x{np.median(t) / first:.3f}", flush=True)


if __name__ == "__main__":
  main()
