"""Commands print what the user needs: third-party INFO lines and Orbax's read-only notes only
with --debug, and a progress bar written to a file (a log) redraws every few seconds at most."""

import contextlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanogptoss_jax.training.loop import train
from nanogptoss_jax.progress import FILE_PROGRESS_INTERVAL_S
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
DATASETS_JAX = "JAX version"  # datasets, at import: "JAX version 0.10.2 available."
JAX_TPU = "Unable to initialize backend 'tpu'"
ORBAX_READ_ONLY = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")
STEPS = 60


def _run(*argv):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop("NANOGPTOSS_DEBUG", None)
  result = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  return result.stdout + result.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run trained with its progress bar going to a file, and that file's text."""
  root = tmp_path_factory.mktemp("quiet")
  cfg = tiny_run(root / "run", root / "cache", steps=STEPS, eval_every=STEPS, ckpt_every=STEPS,
                 log_every=STEPS, sample_tokens=0)
  log = io.StringIO()  # not a terminal, as `train.py > log 2>&1`
  start = time.perf_counter()
  with contextlib.redirect_stderr(log):
    train(cfg, progress=True)
  return root / "run", log.getvalue(), time.perf_counter() - start


def test_a_progress_bar_in_a_file_redraws_every_few_seconds_at_most(trained):
  _, log, seconds = trained
  draws = re.findall(rf"\b(\d+)/{STEPS} \[", log)  # each redraw of the step bar
  assert draws and draws[-1] == str(STEPS), log
  # A draw at the start, one per interval, and the last at the end (a tty's bar draws each step).
  assert len(draws) <= seconds / FILE_PROGRESS_INTERVAL_S + 3, (len(draws), seconds, log)


def test_train_prints_no_third_party_info_lines_unless_debug(tmp_path):
  # Fails on its data path after datasets and JAX have both loaded: quick, and every line seen.
  argv = ["train.py", "--config", "configs/nano.py", "--config.data.path=/no/such/data",
          f"--config.run_dir={tmp_path / 'run'}"]
  quiet = _run(*argv)
  assert "error: data path /no/such/data" in quiet, quiet
  assert DATASETS_JAX not in quiet and JAX_TPU not in quiet, quiet
  debug = _run(*argv, "--debug")
  assert DATASETS_JAX in debug, debug
  # A TPU machine has the backend: the line appears only where JAX tried and failed.
  import jax
  assert (JAX_TPU in debug) == (jax.default_backend() != "tpu"), debug


def test_loading_a_checkpoint_prints_no_orbax_notes_unless_debug(trained):
  run_dir, _, _ = trained
  argv = ["generate.py", "--checkpoint", str(run_dir), "--prompt", "Once", "--max-new-tokens", "2"]
  quiet = _run(*argv)
  assert "loaded" in quiet and not any(note in quiet for note in ORBAX_READ_ONLY), quiet
  assert JAX_TPU not in quiet, quiet
  debug = _run(*argv, "--debug")
  assert all(note in debug for note in ORBAX_READ_ONLY), debug
