"""Wall-clock timing for benchmarks: the best of several runs after a warm-up."""

import time
from typing import Callable


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
