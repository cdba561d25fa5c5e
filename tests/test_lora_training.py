"""LoRA through the trainer: `lora` in the run config adds adapters after the base is built or
loaded (init_from), only they train and are checkpointed, and a stopped run resumes loss for
loss."""

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model.lora import LoraConfig
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.config_files import apply_overrides
from nanogptoss_jax.training.config_io import config_from_dict, config_to_dict
from nanogptoss_jax.training.loop import Trainer, train
from tests.train_helpers import tiny_run


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lora")
  cfg = tiny_run(root / "base", root / "cache", steps=4, eval_every=4, ckpt_every=4,
                 sample_tokens=0)
  train(cfg, progress=False)
  return cfg


def _lora_run(base, run_dir):
  cfg = tiny_run(run_dir, base.data.cache_dir, init_from=base.run_dir, seed=7, steps=6,
                 eval_every=6, ckpt_every=3, sample_tokens=0)
  return apply_overrides(cfg, ["lora.rank=4", "lora.alpha=8", "optim.lr=3e-2"])


def _losses(run_dir) -> list[float]:
  rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
  return [row["loss"] for row in rows if "loss" in row]


def test_the_config_saves_and_loads_its_lora():
  cfg = apply_overrides(tiny_run("r", "c"), ["lora.rank=4", "lora.targets=q,v,mlp1"])
  assert cfg.lora == LoraConfig(rank=4, targets=("q", "v", "mlp1"))
  assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
  assert apply_overrides(cfg, ["lora=none"]).lora is None
  assert config_from_dict(json.loads(json.dumps(config_to_dict(tiny_run("r", "c"))))).lora is None


def test_a_lora_run_trains_adapters_only_and_resumes_loss_for_loss(base_run, tmp_path):
  whole = _lora_run(base_run, tmp_path / "whole")
  train(whole, progress=False)
  split = _lora_run(base_run, tmp_path / "split")
  trainer = Trainer(split, progress=False)
  params = [p for p, _ in nnx.to_flat_state(trainer.state.params)]
  assert len(params) == 2 * 6 * 2 and all(str(p[-1]).startswith("lora_") for p in params)
  assert not any("lora" in str(p) for p, _ in nnx.to_flat_state(trainer.state.frozen))
  trainer.run(until=3)
  trainer.close()
  saved = json.loads(next((tmp_path / "split" / "checkpoints" / "3").rglob("_METADATA"))
                     .read_text())["tree_metadata"]
  arrays = [key for key, value in saved.items()
            if value["value_metadata"]["value_type"] not in ("None", "scalar")
            and key.startswith(("('params'", "('frozen'"))]
  assert arrays and all(key.startswith("('params'") and "lora_" in key for key in arrays)
  train(split, progress=False)
  losses = _losses(tmp_path / "split")
  assert losses == _losses(tmp_path / "whole") and len(losses) == 6
  assert losses[-1] < losses[0]  # the adapters learn
  # The base's weights are untouched; the tuned model is the base plus trained adapters.
  base, _ = weights.load_checkpoint(base_run.run_dir)
  tuned, _ = weights.load_checkpoint(tmp_path / "split")
  tuned_flat = dict(nnx.to_flat_state(nnx.state(tuned, nnx.Param)))
  for path, value in nnx.to_flat_state(nnx.state(base, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(tuned_flat.pop(path)[...]), np.asarray(value[...]))
  assert len(tuned_flat) == 24 and any(np.any(np.asarray(v[...]) != 0)
                                       for p, v in tuned_flat.items() if p[-1] == "lora_b")


def test_a_lora_run_over_a_changed_base_is_one_clear_error(base_run, tmp_path):
  """A LoRA run's checkpoints hold only adapters, so resuming or loading it rebuilds the base
  from init_from: a base whose content changed is refused (train.trainable is empty here)."""
  cfg = _lora_run(base_run, tmp_path / "tuned")
  trainer = Trainer(cfg, progress=False)
  trainer.run(until=3)
  trainer.close()
  sealed = next((Path(base_run.run_dir) / "best").glob("*/checksums.json"))
  original = sealed.read_text()
  try:
    sealed.write_text(original.replace("{", '{"x": "y", ', 1))
    with pytest.raises(UserError, match="changed since this run started"):
      Trainer(cfg, progress=False)
    with pytest.raises(UserError, match="changed since this run started"):
      weights.load_checkpoint(tmp_path / "tuned")
  finally:
    sealed.write_text(original)
  assert (tmp_path / "tuned" / "checkpoints" / "3").is_dir()  # nothing deleted
