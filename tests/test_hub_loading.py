"""load_pretrained and every command over a checkpoint take a hub id: the model equals the one
loaded from the same files on disk. Fetched from a stub hub (HF_ENDPOINT), then read offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from huggingface_hub import constants

from tests.hub_stub import StubHub, read_tree
from nanogptoss_jax.data.bpe import base_encoding
from nanogptoss_jax.data.tokenizer import build_compact_tokenizer
from nanogptoss_jax.pretrained.export import save_pretrained
from nanogptoss_jax.pretrained.load import load_pretrained
from nanogptoss_jax.pretrained.tokenizer import save_tokenizer
from tests.pretrained_helpers import TINY, write_original

REPO = Path(__file__).resolve().parents[1]
REPO_ID = "openai/tiny-oss"
TOKENS = np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 9), dtype=np.int32)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  """{"": the Hugging Face layout's directory, "original": OpenAI's}, as a gpt-oss repo holds,
  each with a tokenizer of the model's 512 ids beside it."""
  tokenizer = build_compact_tokenizer(np.zeros(base_encoding().n_vocab), TINY.vocab_size)
  original = tmp_path_factory.mktemp("original")
  write_original(str(original))
  save_tokenizer(tokenizer, str(original))
  hf = tmp_path_factory.mktemp("hf")
  model, _ = load_pretrained(str(original), dtype="float32", mxfp4="keep")
  save_pretrained(model, tokenizer, str(hf), dtype="float32")
  return {"": hf, "original": original}


@pytest.fixture(scope="module")
def stub(layouts):
  server = StubHub({REPO_ID: read_tree(layouts[""]) | read_tree(layouts["original"], "original/")})
  yield server
  server.close()


def _env(stub, home) -> dict:
  env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": stub.url, "HF_HOME": str(home),
         "HF_HUB_DISABLE_TELEMETRY": "1"}
  for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "NANOGPTOSS_DEBUG"):
    env.pop(name, None)
  return env


@pytest.fixture(scope="module")
def hub_home(stub, tmp_path_factory):
  """An HF_HOME whose cache holds both layouts, fetched from the stub by the export command
  (a fresh process: huggingface_hub reads HF_ENDPOINT at import)."""
  home = tmp_path_factory.mktemp("hf_home")
  for folder in ("", "/original"):
    out = home / f"export{folder.replace('/', '_')}"
    result = subprocess.run(
        [sys.executable, "-m", "nanogptoss_jax.export", "--checkpoint",
         REPO_ID + folder, "--out", str(out), "--dtype", "float32"],
        cwd=REPO, env=_env(stub, home), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
  return home


@pytest.fixture
def offline_cache(hub_home, monkeypatch):
  """This process reads the fetched cache with HF_HUB_OFFLINE, as a user's would."""
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_home / "hub"))
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("folder", ["", "original"])
def test_load_pretrained_by_hub_id_equals_the_files_on_disk(layouts, offline_cache, folder):
  target = "/".join(filter(None, [REPO_ID, folder]))
  by_id, _ = load_pretrained(target, dtype="float32")
  on_disk, _ = load_pretrained(str(layouts[folder]), dtype="float32")
  np.testing.assert_array_equal(np.asarray(by_id(jnp.asarray(TOKENS))),
                                np.asarray(on_disk(jnp.asarray(TOKENS))))


def test_the_export_command_wrote_the_layout_it_fetched(hub_home, layouts):
  """Both exports (one per fetched layout) hold the same weights as the local HF layout."""
  for name in ("export", "export_original"):
    exported = load_pretrained(str(hub_home / name), dtype="float32")[0]
    on_disk = load_pretrained(str(layouts[""]), dtype="float32")[0]
    np.testing.assert_array_equal(np.asarray(exported(jnp.asarray(TOKENS))),
                                  np.asarray(on_disk(jnp.asarray(TOKENS))))


def test_chat_serve_and_generate_open_a_hub_id(offline_cache, capsys):
  from nanogptoss_jax.commands import generate
  from nanogptoss_jax.serving.open_model import open_model
  model, _, plain = open_model(REPO_ID)
  assert model.cfg.num_hidden_layers == TINY.num_hidden_layers and not plain
  generate.main(["--checkpoint", REPO_ID, "--prompt", "a", "--max-new-tokens", "3",
                 "--temperature", "0"])
  assert capsys.readouterr().out.startswith("a")


def test_an_uncached_hub_id_offline_is_one_line(offline_cache, capsys):
  from nanogptoss_jax.commands import generate
  with pytest.raises(SystemExit) as exit_info:
    generate.main(["--checkpoint", "openai/not-fetched", "--prompt", "a"])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err
  assert "error: HF_HUB_OFFLINE is set" in err and "hf download openai/not-fetched" in err, err
