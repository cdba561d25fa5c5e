"""Wall-clock timing for benchmarks: the best of several runs after a warm-up; the matmul peak."""

import time
from typing import Callable

import jax
import jax.numpy as jnp


def best_time(fn: Callable[[], object], repeats: int) -> float:
  """Lowest wall time of fn() over `repeats` runs (after one untimed warm-up run, which compiles).

  fn must block until its work is done (e.g. call jax.block_until_ready).
  """
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  """This machine's best observed FLOP/s on a square matmul (the MFU denominator)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2 * size ** 3 / best_time(lambda: matmul(a, b).block_until_ready(), repeats)
