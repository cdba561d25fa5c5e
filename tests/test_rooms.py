"""The rooms that adapting and scaling build on: one sharding policy for every way a model is
made, and a trainer that starts from another run, trains a subset and resumes it exactly."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.config_io import config_from_dict
from nanogptoss_jax.training.losses import token_losses
from nanogptoss_jax.training.loop import Trainer, train
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]

# In a child with 8 forced devices: a published checkpoint loaded onto the trainer's mesh, and
# the trainer's own placement of a fresh model of that config, for both expert formats.
SHARDING_CHILD = """
import json, sys
import jax
from flax import nnx
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.parallel.mesh import make_mesh
from nanogptoss_jax.pretrained.load import load_pretrained
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.state import abstract_train_state
from tests.pretrained_helpers import TINY, write_original
assert jax.device_count() == 8
write_original(sys.argv[1])
out = {}
for experts in ("float", "mxfp4"):
  execution = ExecutionConfig(fsdp=4, expert_format=experts)
  mesh = make_mesh(execution)
  loaded = load_pretrained(sys.argv[1], execution=execution, mesh=mesh)[0]
  cfg = RunConfig(model=loaded.cfg, execution=execution)
  _, abstract, _ = abstract_train_state(cfg)
  trainer = weights.state_shardings(cfg, mesh, abstract).params
  def specs(tree):
    return {".".join(map(str, path)): str(getattr(v, "sharding", v).spec)
            for path, v in nnx.to_flat_state(tree)}
  out[experts] = {"loaded": specs(nnx.state(loaded, nnx.Param)), "trainer": specs(trainer)}
json.dump(out, open(sys.argv[2], "w"))
"""


def test_a_published_load_and_a_fresh_model_get_the_same_shardings(tmp_path):
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                      "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
  result = subprocess.run([sys.executable, "-c", SHARDING_CHILD, str(tmp_path / "ckpt"),
                           str(tmp_path / "specs.json")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  seen = json.loads((tmp_path / "specs.json").read_text())
  for experts, specs in seen.items():
    assert specs["loaded"] == specs["trainer"], experts
    # The policy really splits: every matrix of the model has an fsdp axis on this mesh.
    split = [path for path, spec in specs["trainer"].items() if "fsdp" in spec]
    assert any("mlp1" in path for path in split) and any("embedding" in path for path in split)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A finished tiny run: the base every test here starts from."""
  root = tmp_path_factory.mktemp("rooms")
  cfg = tiny_run(root / "base", root / "cache", steps=6, eval_every=6, ckpt_every=6,
                 sample_tokens=0)
  train(cfg, progress=False)
  return cfg


def _continued(base, run_dir, **train_changes):
  changes = dict(init_from=base.run_dir, seed=7, steps=6, eval_every=6, ckpt_every=3,
                 sample_tokens=0) | train_changes
  return tiny_run(run_dir, base.data.cache_dir, **changes)


def _losses(run_dir) -> list[float]:
  rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
  return [row["loss"] for row in rows if "loss" in row]


def test_init_from_starts_at_the_base_weights(base_run, tmp_path):
  """Continued on other batches (another seed), the first logged loss is the finished base
  model's loss on that batch, and parameters the base lacks are not needed."""
  cfg = _continued(base_run, tmp_path / "more")
  trainer = Trainer(cfg, progress=False)
  base_model, _ = weights.load_checkpoint(base_run.run_dir)
  batch = trainer._next_batch()  # [accum, B, T + 1]
  want = float(token_losses(base_model, np.asarray(batch[0]))[0].mean())
  trainer.state, metrics = trainer.train_step(trainer.state, batch)
  trainer.close()
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-6)
  assert trainer.source["path"] == str(Path(base_run.run_dir).resolve())


def test_a_trainable_subset_resumes_loss_for_loss_and_checkpoints_leave_the_rest_out(
    base_run, tmp_path):
  """Only the unembedding trains: other parameters keep the base's values, have no optimiser
  state, are absent from checkpoints, and a run stopped and resumed gives the same losses."""
  trainable = dict(trainable=r"^unembedding\.")
  whole = _continued(base_run, tmp_path / "whole", **trainable)
  train(whole, progress=False)
  split = _continued(base_run, tmp_path / "split", **trainable)
  trainer = Trainer(split, progress=False)
  frozen_paths = {p for p, _ in nnx.to_flat_state(trainer.state.frozen)}
  assert frozen_paths and all(p[0] != "unembedding" for p in frozen_paths)
  assert all(p[0] == "unembedding" for p, _ in nnx.to_flat_state(trainer.state.params))
  trainer.run(until=3)
  trainer.close()
  saved = json.loads(next((tmp_path / "split" / "checkpoints" / "3").rglob("_METADATA"))
                     .read_text())["tree_metadata"]
  frozen = {key: value for key, value in saved.items() if key.startswith("('frozen'")}
  assert list(frozen) == ["('frozen',)"]  # an empty node: no frozen array is written
  assert frozen["('frozen',)"]["value_metadata"]["value_type"] == "None"
  params = [key for key in saved if key.startswith("('params'")]
  assert params and all(key.startswith("('params', 'unembedding'") for key in params)
  train(split, progress=False)
  assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
  base_model, _ = weights.load_checkpoint(base_run.run_dir)
  tuned, _ = weights.load_checkpoint(tmp_path / "split")
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(base_model, nnx.Param)),
                               nnx.to_flat_state(nnx.state(tuned, nnx.Param))):
    same = np.array_equal(np.asarray(a[...]), np.asarray(b[...]))
    assert same == (path[0] != "unembedding"), path


def test_a_changed_base_is_one_clear_error(base_run, tmp_path):
  cfg = _continued(base_run, tmp_path / "moved", trainable=r"^unembedding\.", steps=3)
  train(cfg, progress=False)
  resumed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=6))
  sealed = next((Path(base_run.run_dir) / "best").glob("*/checksums.json"))
  original = sealed.read_text()
  try:
    sealed.write_text(original.replace("{", '{"x": "y", ', 1))
    with pytest.raises(UserError, match="changed since this run started"):
      Trainer(resumed, progress=False)
  finally:
    sealed.write_text(original)
  assert (tmp_path / "moved" / "checkpoints" / "3").is_dir()  # nothing deleted


def test_configs_saved_before_the_execution_config_still_load():
  saved = {"model_kind": "gpt_oss", "model": {"num_hidden_layers": 2, "dtype": "bfloat16",
                                              "layers_impl": "scan", "remat": "matmuls"},
           "train": {"fsdp": 2, "steps": 5}}
  cfg = config_from_dict(saved)
  assert cfg.execution.dtype == "bfloat16" and cfg.execution.layers_impl == "scan"
  assert cfg.execution.remat == "matmuls" and cfg.execution.fsdp == 2
  assert cfg.model.num_hidden_layers == 2 and cfg.train.steps == 5
  # A config that named the expert axis's size under `train` (as issue 27 first put it), and one
  # saved with an execution section from before the expert and tensor axes: their defaults.
  moved = config_from_dict({**saved, "train": {"expert": 4}})
  assert moved.execution.expert == 4 and moved.execution.tensor == 1
  older = config_from_dict({"model_kind": "gpt_oss", "model": {}, "execution": {"fsdp": 2}})
  assert older.execution.expert == older.execution.tensor == 1
  assert older.execution.expert_capacity == 0


def test_a_checkpoint_naming_the_router_gate_resumes_loss_for_loss(base_run, tmp_path,
                                                                    monkeypatch):
  """Steps written before the router's rename (`mlp.gate`, no param_names in their meta)
  restore, parameters and AdamW moments alike, and the run goes on as if uninterrupted."""
  from nanogptoss_jax.training import checkpoints
  old_save, old_meta = checkpoints.RunCheckpoints.save, checkpoints.make_meta

  def save_as_before(self, step, state, data_state, meta, **options):
    meta = {key: value for key, value in meta.items() if key != checkpoints.PARAM_NAMES_KEY}
    state = checkpoints.rename_keys(state, {"router": "gate"})
    return old_save(self, step, state, data_state, meta, **options)

  def resumed(name, steps):
    return tiny_run(tmp_path / name, base_run.data.cache_dir, steps=steps, eval_every=100,
                    ckpt_every=4, sample_tokens=0)

  train(resumed("whole", 8), progress=False)
  monkeypatch.setattr(checkpoints.RunCheckpoints, "save", save_as_before)
  trainer = Trainer(resumed("split", 8), progress=False)
  trainer.run(until=4)
  trainer.close()
  saved = json.dumps(json.loads(next((tmp_path / "split" / "checkpoints" / "4")
                                     .rglob("_METADATA")).read_text()))
  assert "'gate'" in saved and "'router'" not in saved  # written as before the rename
  monkeypatch.setattr(checkpoints.RunCheckpoints, "save", old_save)
  assert checkpoints.make_meta is old_meta
  train(resumed("split", 8), progress=False)
  assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
