"""The commands as a user runs them: a mistake prints one `error:` line and no traceback, with
exit code 2 for bad usage and 1 for a failure."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*argv, timeout=120):
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop("NANOGPTOSS_DEBUG", None)
  return subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("argv, code, message", [
    # Not a directory: read as a hub id, which an offline machine cannot fetch.
    (["generate.py", "--checkpoint", "no/such/run"], 1, "or pass a local directory"),
    (["generate.py", "--checkpoint", "x", "--max-new-tokens", "-5"], 2, "--max-new-tokens"),
    (["generate.py", "--checkpoint", "x", "--temperature", "-1"], 2, "--temperature"),
    (["generate.py", "--checkpoint", "x", "--top-p", "2"], 2, "--top-p"),
    (["generate.py", "--checkpoint", "x", "--top-k", "0"], 2, "--top-k"),
    (["compare.py", "--out_dir=/tmp/x"], 2, "unrecognised argument '--out_dir'"),
    (["compare.py", "--config", "configs/compare_nano.py", "--config.seeds=a"], 2, "seeds"),
    (["train.py", "--config", "configs/nope.py"], 1, "config file 'configs/nope.py' does not exist"),
    (["train.py", "--config", "configs/nano.py", "--config.train.stepz=3"], 2, "unknown key"),
    (["train.py", "--config", "configs/nano.py", "--config.optim.lr=-1"], 1, "optim.lr=-1.0"),
    (["train.py", "--config", "configs/nano.py", "extra"], 2, "unrecognised arguments"),
])
def test_a_mistake_is_one_line_without_a_traceback(argv, code, message):
  result = _run(*argv)
  assert result.returncode == code, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in result.stderr[result.stderr.index(errors[0]):], \
      result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["train.py", "generate.py", "compare.py"])
def test_help_exits_zero(script):
  result = _run(script, "--help")
  assert result.returncode == 0 and "nanogptoss-" in result.stdout, result.stderr


def test_debug_shows_the_traceback():
  result = _run("train.py", "--config", "configs/nope.py", "--debug")
  assert result.returncode == 1 and "Traceback" in result.stderr
