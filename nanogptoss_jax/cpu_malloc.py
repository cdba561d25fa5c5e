"""Keeps glibc from returning XLA's large per-step buffers to the OS (a CPU speed fix).

XLA on CPU allocates a jitted step's big temporaries afresh at every call, from its worker
threads. glibc serves blocks above its mmap threshold (at most 32 MiB by default) with new
mmaps, and a worker thread's arena (capped at 64 MiB heaps) falls back to mmap for any large
block whatever the threshold; both are unmapped on free, so every step page-faults its whole
working set again. One arena (the main heap, which grows without that cap) and high mmap and
trim thresholds keep that memory for reuse (docs/benchmarks.md has the measured gain).
glibc reads tunables only at process start, so entry points re-exec themselves once with them.
"""

import os
import sys

TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
            ":glibc.malloc.arena_max=1")
OPT_OUT = "NANOGPTOSS_NO_MALLOC_TUNING"


def reexec_with_malloc_tunables() -> None:
  """Restarts this process with TUNABLES unless already set (Linux only; never on import)."""
  if (sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or os.environ.get(OPT_OUT)
      or not sys.argv or not sys.argv[0]):
    return
  os.environ["GLIBC_TUNABLES"] = TUNABLES
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
