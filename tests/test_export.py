"""save_pretrained / nanogptoss-export: transformers reads our export as the same model, and
load_pretrained reads it back; bad checkpoints fail with one line naming the culprit."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.commands import export as export_command
from nanogptoss_jax.data.tokenizer import FullTokenizer
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model.config import Gpt2Config, GptOssConfig
from nanogptoss_jax.model.registry import build_model
from nanogptoss_jax.pretrained.export import save_pretrained
from nanogptoss_jax.pretrained.load import load_pretrained
from nanogptoss_jax.training.weights import load_checkpoint
from nanogptoss_jax.training.loop import train
from tests.pretrained_helpers import write_original
from tests.factories import relative_error
from tests.train_helpers import tiny_run

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
TOLERANCE = 1e-5


def _transformers_logits(path, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
  with torch.no_grad():
    return model.float().eval()(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _params(model):
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_round_trip(model, tokenizer, out_dir, dtype):
  tokens = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 10), dtype=np.int32)
  theirs = _transformers_logits(out_dir, tokens)
  back, back_tokenizer = load_pretrained(out_dir, dtype="float32", mxfp4="dequantize")
  assert back_tokenizer.to_dict() == tokenizer.to_dict()
  assert relative_error(back(jnp.asarray(tokens)), theirs) <= TOLERANCE
  rounded = {p: v.astype(dtype).astype(np.float32) for p, v in _params(model).items()}
  got = _params(back)
  assert rounded.keys() == got.keys()
  for path, value in rounded.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))
  if dtype == np.float32:  # nothing was rounded: the export is the model itself
    assert relative_error(model(jnp.asarray(tokens)), theirs) <= TOLERANCE


def test_trained_nano_run_exports_through_the_command(tmp_path):
  cfg = tiny_run(tmp_path / "run", tmp_path / "cache", steps=4, eval_every=4, ckpt_every=4)
  train(cfg, progress=False)
  out = tmp_path / "export"
  export_command.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out),
                       "--dtype", "float32"])
  model, tokenizer = load_checkpoint(tmp_path / "run")
  assert tokenizer.vocab_size == cfg.model.vocab_size  # compact: its own ids, saved beside
  assert json.load(open(out / "config.json"))["vocab_size"] == cfg.model.vocab_size
  _assert_round_trip(model, tokenizer, str(out), np.float32)


def test_random_full_vocab_model_round_trips_in_bfloat16(tmp_path):
  cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, hidden_size=32,
                     intermediate_size=32, head_dim=8, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=8, rope_scaling_factor=1.0)
  model = build_model(cfg, seed=3)
  # Non-trivial biases and sinks, so a dropped one shows.
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] in ("bias", "sinks", "mlp1_bias", "mlp2_bias"):
      key = jax.random.key(hash(path) % 2**31)
      variable.set_value(0.3 * jax.random.normal(key, variable.shape))
  tokenizer = FullTokenizer()
  save_pretrained(model, tokenizer, str(tmp_path))
  _assert_round_trip(model, tokenizer, str(tmp_path), jnp.bfloat16)


def test_gpt2_is_refused(tmp_path):
  model = build_model(Gpt2Config(num_hidden_layers=1, vocab_size=512, hidden_size=32,
                                 num_attention_heads=2, max_position_embeddings=16))
  with pytest.raises(UserError, match="GPT-OSS models only"):
    save_pretrained(model, FullTokenizer(), str(tmp_path))


@pytest.fixture
def original_dir(tmp_path):
  write_original(str(tmp_path), files=1)
  return tmp_path


def _edit_config(path, **changes):
  config = json.load(open(path / "config.json"))
  json.dump(config | changes, open(path / "config.json", "w"))


def test_missing_directory_and_missing_shard(tmp_path, original_dir):
  with pytest.raises(UserError, match="does not exist"):
    load_pretrained(str(tmp_path / "nowhere"))
  json.dump({"weight_map": {"x": "model-00002-of-00002.safetensors"}},
            open(original_dir / "model.safetensors.index.json", "w"))
  _edit_config(original_dir, model_type="gpt_oss")
  with pytest.raises(UserError, match="model-00002-of-00002.safetensors does not exist"):
    load_pretrained(str(original_dir))


def test_truncated_safetensors_names_the_tensor(original_dir):
  file = original_dir / "model-0.safetensors"
  os.truncate(file, file.stat().st_size - 100)
  with pytest.raises(UserError, match=r"is truncated: tensor \S+ needs bytes"):
    load_pretrained(str(original_dir))


def test_unsupported_settings_are_refused_by_name(original_dir):
  _edit_config(original_dir, rms_norm_eps=1e-6)
  with pytest.raises(UserError, match="rms_norm_eps"):
    load_pretrained(str(original_dir))  # not a reference field in the original layout
  hf = {"model_type": "gpt_oss", "num_hidden_layers": 2, "sliding_window": 4}
  for bad, field in (({"rms_norm_eps": 1e-6}, "rms_norm_eps"),
                     ({"tie_word_embeddings": True}, "tie_word_embeddings"),
                     ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": True,
                                        "original_max_position_embeddings": 256}},
                      "rope_scaling.truncate"),
                     ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types")):
    json.dump(hf | bad, open(original_dir / "config.json", "w"))
    with pytest.raises(UserError, match=field):
      load_pretrained(str(original_dir))


def test_shape_mismatch_names_the_tensor(original_dir):
  _edit_config(original_dir, intermediate_size=96)
  with pytest.raises(UserError, match=r"tensor block\.0\.mlp\.mlp1_bias has shape"):
    load_pretrained(str(original_dir), mxfp4="dequantize")


def test_command_prints_one_error_line(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    export_command.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path)])
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "nowhere" in err[0]
