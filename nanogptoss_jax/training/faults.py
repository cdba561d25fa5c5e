"""A test-only hook that kills this process at a named point of a run, to prove that no fault
there loses work. Off unless FAULT_ENV names a point: `NANOGPTOSS_FAULT=checkpoint_write:8`."""

import os
import signal

FAULT_ENV = "NANOGPTOSS_FAULT"
# Where the loop can be killed: after a step's dispatch, with a checkpoint write in flight,
# in the middle of an eval, and right after a checkpoint is complete on disk.
POINTS = ("mid_step", "checkpoint_write", "mid_eval", "after_save")


def maybe_kill(point: str, step: int, before=None) -> None:
  """SIGKILL (no cleanup, no flush: as a power cut or the OOM killer) at `point` of `step`,
  after calling `before()` if given."""
  spec = os.environ.get(FAULT_ENV)
  if not spec:
    return
  name, _, at = spec.partition(":")
  if name not in POINTS:
    raise ValueError(f"{FAULT_ENV}={spec!r}: the point must be one of {POINTS}")
  if name == point and int(at) == step:
    if before is not None:
      before()
    os.kill(os.getpid(), signal.SIGKILL)
