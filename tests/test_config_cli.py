"""Run configs from files and the command line: typed overrides, refusals, JSON, run rules."""

import dataclasses
import json
from pathlib import Path

import pytest

from nanogptoss_jax.model.config import ConfigError, Gpt2Config, GptOssConfig
from nanogptoss_jax.training.config_files import (ConfigFileError, apply_overrides,
                                                  load_config_file, parse_args)
from nanogptoss_jax.training.config_io import (ConfigOverrideError, config_from_dict,
                                               config_to_dict)
from nanogptoss_jax.training.run_config import (DataConfig, RunConfig, TrainConfig, gpt2_twin,
                                                validate_run_config)

FULL_VOCAB_SIZE = 201088  # o200k_harmony's n_vocab
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
# Run configs; compare_*.py describe a comparison of two runs (tests/test_compare.py loads them).
CONFIG_FILES = sorted(p for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("compare_"))
NANO = CONFIGS_DIR / "nano.py"
TINY_MODEL = GptOssConfig(num_hidden_layers=2, num_experts=2, experts_per_token=1, vocab_size=64,
                          hidden_size=16, intermediate_size=16, head_dim=8,
                          num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
                          rope_scaling_factor=1.0)


@pytest.fixture
def run() -> RunConfig:
  return RunConfig(model=TINY_MODEL, data=DataConfig(compact_vocab_size=64))


def test_overrides_are_parsed_by_field_type(run):
  cfg = apply_overrides(run, {"optim.lr": "1e-3", "train.steps": "7", "run_dir": "runs/x",
                              "model.num_hidden_layers": "3", "optim.grad_clip": "2",
                              "data.path": "../shared/data/tinystories/hf"})
  assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
  assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
  assert cfg.optim.grad_clip == 2.0 and isinstance(cfg.optim.grad_clip, float)  # int string
  assert cfg.model.num_hidden_layers == 3 and isinstance(cfg.model, GptOssConfig)
  assert (cfg.run_dir, cfg.data.path) == ("runs/x", "../shared/data/tinystories/hf")
  # Untouched fields and the original config stay as they were.
  assert cfg.optim.min_lr == run.optim.min_lr and run.optim.lr != 1e-3


def test_list_overrides_and_last_one_wins(run):
  cfg = apply_overrides(run, ["train.seed=1", "train.sample_prompt=a=b", "train.seed=2"])
  assert cfg.train.seed == 2 and cfg.train.sample_prompt == "a=b"


@pytest.mark.parametrize("text, expected", [("true", True), ("Yes", True), ("1", True),
                                            ("false", False), ("no", False), ("0", False)])
def test_bool_words(text, expected):
  @dataclasses.dataclass(frozen=True)
  class Flags:
    on: bool = False

  @dataclasses.dataclass(frozen=True)
  class Holder:
    flags: Flags = Flags()

  assert apply_overrides(Holder(), {"flags.on": text}).flags.on is expected
  with pytest.raises(ConfigOverrideError, match=r"'flags.on': expected bool, got 'maybe'"):
    apply_overrides(Holder(), {"flags.on": "maybe"})


def test_optional_int_accepts_none():
  run = RunConfig(model=Gpt2Config(vocab_size=64, hidden_size=16, num_attention_heads=2))
  assert apply_overrides(run, {"model.intermediate_size": "32"}).model.intermediate_size == 32
  cfg = apply_overrides(run, {"model.intermediate_size": "None"})
  assert cfg.model.intermediate_size is None
  with pytest.raises(ConfigOverrideError, match=r"expected int \| None, got 'lots'"):
    apply_overrides(run, {"model.intermediate_size": "lots"})


def test_unknown_key_lists_the_valid_keys(run):
  with pytest.raises(ConfigOverrideError) as error:
    apply_overrides(run, {"optim.lrr": "1e-3"})
  assert str(error.value) == (
      "unknown key 'optim.lrr'; valid keys under 'optim': beta1, beta2, eps, grad_clip, lr, "
      "min_lr, warmup_steps, weight_decay")
  with pytest.raises(ConfigOverrideError, match="valid keys at the top level: data, execution, "
                     "lora, model, optim, run_dir, train"):
    apply_overrides(run, {"lr": "1e-3"})
  with pytest.raises(ConfigOverrideError, match="'optim.lr' is a value, not a sub-config"):
    apply_overrides(run, {"optim.lr.x": "1"})


@pytest.mark.parametrize("key, value, expected", [
    ("optim.lr", "fast", "float"), ("train.steps", "1.5", "int"), ("train.steps", "", "int"),
    ("model.hidden_size", "wide", "int")])
def test_wrong_type_names_key_type_and_value(run, key, value, expected):
  with pytest.raises(ConfigOverrideError) as error:
    apply_overrides(run, {key: value})
  assert str(error.value) == f"bad value for {key!r}: expected {expected}, got {value!r}"


def test_setting_a_whole_sub_config_is_refused(run):
  with pytest.raises(ConfigOverrideError, match="cannot set the whole sub-config 'optim'"):
    apply_overrides(run, {"optim": "3"})


def test_invalid_model_values_raise_the_model_error(run):
  with pytest.raises(ConfigError, match="num_attention_heads must be a multiple of "
                     "num_key_value_heads=2"):
    apply_overrides(run, {"model.num_attention_heads": "3", "model.num_key_value_heads": "2"})


def test_coupled_fields_change_together(run):
  # 3 query heads over 3 kv heads is valid, though neither change alone is (heads=2, kv=1 now).
  cfg = apply_overrides(run, {"model.num_key_value_heads": "3", "model.num_attention_heads": "3"})
  assert (cfg.model.num_attention_heads, cfg.model.num_key_value_heads) == (3, 3)


def test_parse_args_forms(tmp_path):
  argv = ["--config", str(NANO), "--config.optim.lr=2e-3", "--config.run_dir", "runs/x",
          "--resume", "--config.model.num_hidden_layers=2", "extra"]
  cfg, rest = parse_args(argv)
  assert (cfg.optim.lr, cfg.run_dir, cfg.model.num_hidden_layers) == (2e-3, "runs/x", 2)
  assert rest == ["--resume", "extra"]
  cfg, rest = parse_args([f"--config={NANO}"])
  assert cfg == load_config_file(NANO) and rest == []


def test_parse_args_refusals():
  with pytest.raises(ConfigOverrideError, match="missing --config PATH"):
    parse_args(["--config.optim.lr=1"])
  with pytest.raises(ConfigOverrideError, match="--config.optim.lr needs a value"):
    parse_args(["--config", str(NANO), "--config.optim.lr"])
  with pytest.raises(ConfigError, match=r"model.vocab_size=100 must equal data.compact_vocab_size"):
    parse_args(["--config", str(NANO), "--config.model.vocab_size=100"])


def test_load_config_file_errors(tmp_path):
  with pytest.raises(ConfigFileError, match="does not exist"):
    load_config_file(tmp_path / "missing.py")
  no_get_config = tmp_path / "empty.py"
  no_get_config.write_text("X = 1\n")
  with pytest.raises(ConfigFileError, match=r"must define get_config\(\)"):
    load_config_file(no_get_config)
  wrong_type = tmp_path / "wrong.py"
  wrong_type.write_text("def get_config():\n  return {}\n")
  with pytest.raises(ConfigFileError, match="returned dict, expected RunConfig"):
    load_config_file(wrong_type)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_file_loads_validates_and_round_trips(path):
  cfg = load_config_file(path)
  validate_run_config(cfg)
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_json_round_trip_keeps_model_kind_and_types(run):
  twin = gpt2_twin(run)
  for cfg, kind in ((run, "gpt_oss"), (twin, "gpt2")):
    saved = json.loads(json.dumps(config_to_dict(cfg)))
    assert saved["model_kind"] == kind
    restored = config_from_dict(saved)
    assert restored == cfg and type(restored.model) is type(cfg.model)
    assert isinstance(restored.model.rope_theta if kind == "gpt_oss" else restored.model.dropout,
                      float)
  with pytest.raises(ConfigOverrideError, match="unknown key 'optim.lrr' in saved config"):
    config_from_dict({**config_to_dict(run), "optim": {"lrr": 1.0}})
  with pytest.raises(ConfigOverrideError, match="model_kind must be one of"):
    config_from_dict({**config_to_dict(run), "model_kind": "llama"})


def test_gpt2_twins_match_their_gpt_oss_config():
  for name in ("nano", "small", "medium", "large"):
    oss, gpt2 = (load_config_file(f"{CONFIGS_DIR / name}.py{variant}")
                 for variant in ("", ":gpt2"))
    assert isinstance(gpt2.model, Gpt2Config)
    for field in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
      assert getattr(gpt2.model, field) == getattr(oss.model, field), (name, field)
    assert (gpt2.data, gpt2.optim, gpt2.train) == (oss.data, oss.optim, oss.train)
    assert gpt2.model.mlp_size == 4 * oss.model.hidden_size and gpt2.model.dropout == 0.0
    assert gpt2.model.max_position_embeddings >= oss.train.context_len
    assert gpt2.run_dir == f"runs/gpt2_{name}"


def test_validate_lists_every_broken_rule(run):
  bad = dataclasses.replace(
      run, data=DataConfig(compact_vocab_size=0),
      train=TrainConfig(steps=0, batch_size=6, grad_accum=4, eval_every=0, kd_mode="nope",
                        kd_alpha=1.5, kd_temperature=0.0, kd_k=0),
      optim=dataclasses.replace(run.optim, lr=1e-4, min_lr=1e-3))
  with pytest.raises(ConfigError) as error:
    validate_run_config(bad)
  message = str(error.value)
  for expected in (f"model.vocab_size=64 must equal o200k_harmony's size "
                   f"(data.compact_vocab_size=0)={FULL_VOCAB_SIZE}",
                   "train.steps=0 must be > 0",
                   "train.batch_size=6 must be a positive multiple of train.grad_accum=4",
                   "train.eval_every=0 must be > 0",
                   "train.kd_mode='nope' must be one of ('online', 'top_k', 'sampled')",
                   "train.kd_alpha=1.5 must be in [0, 1]",
                   "train.kd_temperature=0.0 must be > 0", "train.kd_k=0 must be > 0",
                   "optim.min_lr=0.001 must be in [0, optim.lr=0.0001]"):
    assert expected in message
  # A warmup longer than the run is allowed: the schedule clips it.
  validate_run_config(apply_overrides(run, {"optim.warmup_steps": "5000", "train.steps": "10"}))


def test_gpt2_context_must_fit_its_position_table(run):
  twin = gpt2_twin(run)
  with pytest.raises(ConfigError, match="train.context_len=512 must be <= "
                     "model.max_position_embeddings=256"):
    validate_run_config(apply_overrides(twin, {"train.context_len": "512"}))
