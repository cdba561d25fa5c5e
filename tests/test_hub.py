"""Hub ids resolved against a local stub hub (HF_ENDPOINT): only the named layout is fetched,
into the standard cache; a dropped download resumes; offline, the cache is used or one line says
what to fetch. Each resolve runs in a fresh process, as huggingface_hub reads its settings at
import."""

import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hub_stub import COMMIT, StubHub
from nanogptoss_jax.pretrained import hub

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "openai/tiny-oss"
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes a download in chunks of this many bytes
ROOT_LAYOUT = ("config.json", "model-00000-of-00002.safetensors",
               "model-00001-of-00002.safetensors", "model.safetensors.index.json")
ORIGINAL_LAYOUT = ("original/config.json", "original/model.safetensors")
BIG_SHARD = ROOT_LAYOUT[1]
RESOLVE = ("import sys; from nanogptoss_jax import cli; from nanogptoss_jax.pretrained import hub; "
           "cli.run(lambda argv: print(hub.resolve(argv[0])), sys.argv[1:])")


def _files() -> dict[str, bytes]:
  rng = random.Random(0)
  data = {name: rng.randbytes(1000) for name in ROOT_LAYOUT + ORIGINAL_LAYOUT}
  data[BIG_SHARD] = rng.randbytes(CHUNK + 600_000)  # past one chunk: a resume can start inside
  # Beside the two layouts, what a gpt-oss repository also holds and no layout needs.
  data |= {"metal/model.bin": b"metal weights", "README.md": b"card", "original/dtypes.json": b"{}"}
  return data


@pytest.fixture
def stub():
  server = StubHub({REPO_ID: _files()})
  yield server
  server.close()


def _resolve(stub, home, target: str, offline: bool = False) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": stub.url, "HF_HOME": str(home),
         "HF_HUB_DISABLE_TELEMETRY": "1"}
  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN",
               "NANOGPTOSS_DEBUG"):
    env.pop(name, None)
  if offline:
    env["HF_HUB_OFFLINE"] = "1"
  return subprocess.run([sys.executable, "-c", RESOLVE, target], env=env, capture_output=True,
                        text=True, timeout=120)


def _snapshot(home) -> Path:
  return Path(home) / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT


def _error_line(result) -> str:
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


@pytest.mark.parametrize("folder, layout", [("", ROOT_LAYOUT), ("/original", ORIGINAL_LAYOUT)])
def test_a_hub_id_fetches_only_its_layout_into_the_cache(stub, tmp_path, folder, layout):
  result = _resolve(stub, tmp_path, REPO_ID + folder)
  assert result.returncode == 0, result.stderr[-3000:]
  local = Path(result.stdout.strip())
  assert local == _snapshot(tmp_path) / folder.strip("/")
  files = _files()
  for name in layout:
    assert (_snapshot(tmp_path) / name).read_bytes() == files[name], name
  assert stub.fetched() == set(layout)  # nothing of the other layout, metal/ or the card
  assert f"Fetching {len(layout)} files" in result.stderr  # huggingface_hub's progress


def test_a_dropped_connection_resumes_where_it_stopped(stub, tmp_path):
  stub.drop_after[BIG_SHARD] = CHUNK + 300_000
  result = _resolve(stub, tmp_path, REPO_ID)
  assert result.returncode == 0, result.stderr[-3000:]
  # The first GET was cut after a whole chunk had been written; the second asked for the rest.
  assert stub.gets(BIG_SHARD) == [None, f"bytes={CHUNK}-"]
  assert (_snapshot(tmp_path) / BIG_SHARD).read_bytes() == _files()[BIG_SHARD]


def test_a_failed_fetch_is_one_line_and_a_rerun_fetches_only_what_is_missing(stub, tmp_path):
  stub.fail_once[ROOT_LAYOUT[2]] = 500
  line = _error_line(_resolve(stub, tmp_path, REPO_ID))
  assert "fetching openai/tiny-oss" in line and "run the same command again" in line, line
  # Offline with that partial cache: one line saying the cache lacks files, no request made.
  asked = len(stub.requests)
  line = _error_line(_resolve(stub, tmp_path, REPO_ID, offline=True))
  assert "HF_HUB_OFFLINE" in line and "lacks some of its files" in line, line
  assert len(stub.requests) == asked
  result = _resolve(stub, tmp_path, REPO_ID)
  assert result.returncode == 0, result.stderr[-3000:]
  for name in ROOT_LAYOUT:
    assert len(stub.gets(name)) == (2 if name == ROOT_LAYOUT[2] else 1), (name, stub.requests)


def test_offline_the_cache_is_used_without_asking_the_hub(stub, tmp_path):
  first = _resolve(stub, tmp_path, REPO_ID + "/original")
  assert first.returncode == 0, first.stderr[-3000:]
  asked = len(stub.requests)
  again = _resolve(stub, tmp_path, REPO_ID + "/original", offline=True)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout == first.stdout
  assert len(stub.requests) == asked


def test_offline_without_the_cache_one_line_gives_the_command_that_fetches_it(stub, tmp_path):
  line = _error_line(_resolve(stub, tmp_path / "empty", REPO_ID, offline=True))
  assert not stub.requests
  assert "HF_HUB_OFFLINE is set" in line and "Run once without HF_HUB_OFFLINE" in line, line
  command = line.split("`")[1]
  assert command.startswith(f"hf download {REPO_ID} ")
  # The command it names, run online, fills a cache that then resolves offline.
  env = {**os.environ, "HF_ENDPOINT": stub.url, "HF_HOME": str(tmp_path / "by_hand"),
         "HF_HUB_DISABLE_TELEMETRY": "1"}
  env.pop("HF_HUB_OFFLINE", None)
  hf = Path(sys.executable).parent / "hf"
  subprocess.run([str(hf)] + shlex.split(command)[1:], env=env, check=True, capture_output=True,
                 timeout=120)
  assert stub.fetched() == set(ROOT_LAYOUT)
  result = _resolve(stub, tmp_path / "by_hand", REPO_ID, offline=True)
  assert result.returncode == 0, result.stderr[-3000:]


def test_an_unknown_repository_or_folder_is_one_line(stub, tmp_path):
  line = _error_line(_resolve(stub, tmp_path, "nobody/no-such-model"))
  assert "nobody/no-such-model is neither a local directory nor a model repository" in line
  line = _error_line(_resolve(stub, tmp_path, REPO_ID + "/metal"))
  assert f"try {REPO_ID}, {REPO_ID}/original" in line, line


def test_local_paths_are_never_hub_ids(tmp_path, monkeypatch):
  (tmp_path / "owner" / "name").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert not hub.is_hub_id("owner/name")  # exists here
  assert hub.is_hub_id("owner/other") and hub.is_hub_id("openai/gpt-oss-20b/original@main")
  for path in ("gpt-oss-20b", "./owner/other", "../owner/other", str(tmp_path / "x"),
               "owner/name with space"):
    assert not hub.is_hub_id(path), path
  assert hub.resolve("owner/name") == "owner/name"
