"""Faults a run survives with nothing lost: SIGKILL at several points (a test-only hook names
the point, so each is hit exactly), damaged checkpoints, a full disk. Prints the table of faults
tried and survived at the end of the session (see conftest)."""

import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.faults import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
STEPS, CKPT_EVERY, EVAL_EVERY = 12, 4, 6
# (point, step) of each kill. Orbax writes in the background, so a kill may also catch the
# previous step's write unfinished; only after_save knows where the rerun starts (step 8).
KILLS = [("mid_step", 5), ("checkpoint_write", 8), ("mid_eval", 6), ("after_save", 8)]
FAULT_TABLE = []  # (fault, survived, data lost): printed by conftest's terminal summary
CONFIG_TEXT = """from tests.train_helpers import tiny_run

def get_config():
  return tiny_run({run_dir!r}, {cache_dir!r}, steps={steps}, ckpt_every={ckpt}, eval_every={eval})
"""


def _config_file(tmp: Path, run_dir: Path, cache_dir: Path) -> Path:
  path = tmp / f"config_{run_dir.name}.py"
  path.write_text(CONFIG_TEXT.format(run_dir=str(run_dir), cache_dir=str(cache_dir), steps=STEPS,
                                     ckpt=CKPT_EVERY, eval=EVAL_EVERY))
  return path


def _train(config: Path, tmp: Path, fault: str | None = None, limit_bytes: int | None = None):
  """`python train.py --config config` in a child process, optionally killed or disk-limited."""
  env = {**os.environ, "PYTHONPATH": str(REPO),
         "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax-cache"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env.pop(FAULT_ENV, None)
  if fault:
    env[FAULT_ENV] = fault

  def limit():  # a real file-size limit: TensorStore's C++ writes fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

  return subprocess.run([sys.executable, "train.py", "--config", str(config)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300,
                        preexec_fn=limit if limit_bytes else None)


def _rows(run_dir: Path) -> tuple[dict, dict]:
  """(step -> loss row without its timing, step -> eval row); a step logged twice fails."""
  steps, evals = {}, {}
  for line in (run_dir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    target = evals if "val_loss" in row else steps
    assert row["step"] not in target, f"step {row['step']} logged twice"
    target[row["step"]] = {k: v for k, v in row.items() if k != "tokens_per_s"}
  return steps, evals


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir):
  """One uninterrupted run, shared by every fault."""
  tmp = tmp_path_factory.mktemp("faults")
  run_dir = tmp / "baseline"
  result = _train(_config_file(tmp, run_dir, cache_dir), tmp)
  assert result.returncode == 0, result.stderr[-3000:]
  return tmp, run_dir, _rows(run_dir)


@pytest.mark.parametrize("point, step", KILLS)
def test_sigkill_then_rerun_equals_the_uninterrupted_run(baseline, cache_dir, point, step):
  tmp, _, (base_steps, base_evals) = baseline
  run_dir = tmp / f"kill_{point}_{step}"
  config = _config_file(tmp, run_dir, cache_dir)
  killed = _train(config, tmp, fault=f"{point}:{step}")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  rerun = _train(config, tmp)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  resumed = re.search(r"resumed from step (\d+)", rerun.stderr)
  if point == "after_save":
    assert resumed and resumed.group(1) == str(step), rerun.stderr[-3000:]
  steps, evals = _rows(run_dir)
  assert steps == base_steps  # every step once, loss for loss, bit for bit
  assert evals == base_evals  # val loss, bits per byte, the eval's train_loss, the sample
  start = f"resumed at step {resumed.group(1)}" if resumed else "no checkpoint yet: restarted"
  FAULT_TABLE.append((f"SIGKILL at {point}, step {step}", "yes",
                      f"none ({start}; per-step losses identical)"))


def _damage(path: Path, how: str) -> None:
  if how == "flip":
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
  elif how == "truncate":
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  else:
    path.unlink()


def _largest_file(step_dir: Path) -> Path:
  return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _params(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.mark.parametrize("how", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("where", ["best", "best and newest periodic"])
def test_a_damaged_checkpoint_is_skipped_and_named(baseline, tmp_path, caplog, how, where):
  _, base_dir, _ = baseline
  run_dir = tmp_path / "run"
  shutil.copytree(base_dir, run_dir)
  best_step = max(int(p.name) for p in (run_dir / ckpt.BEST_DIR).iterdir() if p.name.isdigit())
  periodic = sorted(int(p.name) for p in (run_dir / ckpt.PERIODIC_DIR).iterdir()
                    if p.name.isdigit())
  damaged = [run_dir / ckpt.BEST_DIR / str(best_step)]
  if where != "best":
    damaged.append(run_dir / ckpt.PERIODIC_DIR / str(periodic[-1]))
  expected = periodic[-1] if where == "best" else periodic[-2]
  for step_dir in damaged:
    _damage(_largest_file(step_dir), how)
  before = sorted(str(p) for p in run_dir.rglob("*"))
  with caplog.at_level(logging.INFO):
    model, _ = weights.load_checkpoint(run_dir)
  assert f"loaded {run_dir}/{ckpt.PERIODIC_DIR}/{expected}" in caplog.text
  for step_dir in damaged:
    assert f"{step_dir.parent.name}/{step_dir.name} (" in caplog.text  # named as skipped
  reference = ckpt.read_only_manager(base_dir / ckpt.PERIODIC_DIR)
  want, _ = weights.load_step(reference, expected)
  assert all(np.array_equal(a, b) for a, b in zip(_params(model), _params(want)))
  assert sorted(str(p) for p in run_dir.rglob("*")) == before  # a reader moves nothing
  FAULT_TABLE.append((f"{how} a file of {where}", "yes",
                      f"none (loaded checkpoints/{expected}, skipped {len(damaged)})"))


def test_a_full_disk_fails_clearly_and_keeps_earlier_checkpoints(baseline, cache_dir):
  tmp, _, _ = baseline
  run_dir = tmp / "disk_full"
  config = _config_file(tmp, run_dir, cache_dir)
  first = _train(config, tmp, fault="after_save:4")  # a complete checkpoint at step 4
  assert first.returncode == -signal.SIGKILL
  saved = sorted(p.name for p in (run_dir / ckpt.PERIODIC_DIR).iterdir())
  # Files may grow to 64 KiB: the log and the JSON parts fit, the next step's arrays do not.
  full = _train(config, tmp, limit_bytes=64 * 1024)
  assert full.returncode == 1, full.stderr[-3000:]
  errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "could not write a checkpoint" in errors[0], full.stderr[-3000:]
  assert "Traceback" not in full.stderr, full.stderr[-3000:]  # Orbax's threads' ones too
  assert [p.name for p in sorted((run_dir / ckpt.PERIODIC_DIR).iterdir())
          if p.name.isdigit()] == [s for s in saved if s.isdigit()]
  model, _ = weights.load_checkpoint(run_dir)  # step 4 still loads
  rerun = _train(config, tmp)  # room again: the run resumes and finishes
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  FAULT_TABLE.append(("disk full during a save (RLIMIT_FSIZE 64 KiB)", "yes",
                      "none (one-line error; step 4 intact, loaded, resumed)"))
