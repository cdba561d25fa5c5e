"""Session setup shared by every test: an offline tiktoken cache, paths to the shared data, and
(with CI set) a run that fails rather than skips when an oracle is missing."""

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The repository's parent holds shared/ (tiktoken cache, TinyStories sample), here and in CI.
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"
TIKTOKEN_SOURCE_DIR = SHARED_DIR / "tiktoken"
TINYSTORIES_DIR = SHARED_DIR / "data" / "tinystories"


def _use_offline_tiktoken_cache() -> None:
  """Points tiktoken at a writable copy of shared/tiktoken unless the user chose a cache."""
  if "TIKTOKEN_CACHE_DIR" in os.environ or not TIKTOKEN_SOURCE_DIR.is_dir():
    return
  cache_dir = Path(tempfile.mkdtemp(prefix="tiktoken-cache-"))
  atexit.register(shutil.rmtree, cache_dir, ignore_errors=True)
  # Copy file contents only: the shared folder is read-only and tiktoken may write beside the file.
  for source in TIKTOKEN_SOURCE_DIR.iterdir():
    if source.is_file():
      shutil.copyfile(source, cache_dir / source.name)
  os.environ["TIKTOKEN_CACHE_DIR"] = str(cache_dir)


# At import, before any test module loads tiktoken.
_use_offline_tiktoken_cache()

# XLA's compiled programs on disk, shared by the xdist workers and the commands tests start:
# many tests compile the same tiny train step, and each fault-injection run compiles it again
# in a fresh process. Set here, before anything imports JAX, so subprocesses inherit it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".cache" / "jax-tests"))


# What the tests compare against or drive; without one, its tests skip on a laptop, but a CI
# run that skipped them would pass having proven nothing.
ORACLE_MODULES = ("torch", "gpt_oss.torch.model", "transformers", "peft", "openai_harmony",
                  "openai", "lm_eval", "datasets", "selenium.webdriver", "wandb")
ORACLE_PROGRAMS = ("chromium", "chromedriver")


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ImportError:  # a parent package is missing
    return False


def pytest_configure(config):
  if not os.environ.get("CI"):
    return
  missing = [name for name in ORACLE_MODULES if not _importable(name)]
  missing += [name for name in ORACLE_PROGRAMS if shutil.which(name) is None]
  if missing:
    pytest.exit(f"CI is set but {', '.join(missing)} cannot be found, so their tests would skip; "
                f"install them (bash scripts/setup.sh test; chromium via apt) or unset CI",
                returncode=1)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """The shared/ folder beside the repository."""
  return SHARED_DIR


@pytest.fixture(scope="session")
def tinystories_dir() -> Path:
  """The TinyStories sample (train/valid .txt and an hf/ parquet mirror)."""
  return TINYSTORIES_DIR


def _fault_rows() -> list:
  # pytest may have imported the module as `test_faults` or `tests.test_faults`.
  modules = {id(module): module for name, module in list(sys.modules.items())
             if name.endswith("test_faults")}
  return [list(row) for module in modules.values() for row in getattr(module, "FAULT_TABLE", [])]


_worker_fault_rows = []  # under pytest-xdist: the rows each worker sent back


def pytest_sessionfinish(session):
  if hasattr(session.config, "workeroutput"):  # an xdist worker: hand the rows to the controller
    session.config.workeroutput["fault_rows"] = _fault_rows()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  _worker_fault_rows.extend(getattr(node, "workeroutput", {}).get("fault_rows", []))


def pytest_terminal_summary(terminalreporter):
  """The fault-injection suite's table: every fault tried, whether the run survived, what was lost."""
  rows = _fault_rows() + _worker_fault_rows
  if rows:
    terminalreporter.write_line("\nfaults tried | survived | data lost")
    for row in rows:
      terminalreporter.write_line(" | ".join(row))
