"""The training loop: learning, exact resume, SIGTERM, NaN stops, checkpoints, multi-device."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import weights
from nanogptoss_jax.model.registry import build_model
from nanogptoss_jax.training.optimizer import make_optimizer
from nanogptoss_jax.training.run_config import gpt2_twin
from nanogptoss_jax.training.state import init_train_state, split_model
from nanogptoss_jax.training.step import make_train_step
from nanogptoss_jax.training.loop import Trainer, TrainingDivergedError, train
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """One token cache for the module: the sample is tokenised once."""
  return tmp_path_factory.mktemp("token-cache")


def step_losses(run_dir: Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_one_step_lowers_loss_on_a_fixed_batch(tmp_path):
  cfg = tiny_run(tmp_path, tmp_path)
  model = build_model(cfg.model, 0)
  graphdef = split_model(model)[0]
  tx = make_optimizer(dataclasses.replace(cfg.optim, warmup_steps=0), 10)
  state = init_train_state(model, tx)
  step = jax.jit(make_train_step(graphdef, cfg, tx))
  batch = jax.random.randint(jax.random.key(0), (1, 8, 33), 0, cfg.model.vocab_size)
  state, first = step(state, batch)
  _, second = step(state, batch)
  assert float(second["loss"]) < float(first["loss"]) - 1e-3


def test_training_lowers_validation_loss(tmp_path, cache_dir):
  cfg = tiny_run(tmp_path / "run", cache_dir, steps=36, eval_every=6, ckpt_every=36)
  train(cfg, progress=False)
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  val = [row["val_loss"] for row in rows if "val_loss" in row]
  assert len(val) == 6
  assert val[-1] < val[0] - 0.5, val
  assert (tmp_path / "run" / "loss.png").stat().st_size > 0
  model, tokenizer = weights.load_checkpoint(tmp_path / "run")
  assert tokenizer.vocab_size == cfg.model.vocab_size
  assert model.cfg.stop_tokens == tokenizer.stop_ids  # generate()'s default, in compact ids
  assert model(jnp.asarray([tokenizer.encode("Once upon a time")])).shape[-1] == tokenizer.vocab_size


def test_resume_equals_uninterrupted(tmp_path, cache_dir):
  full = tiny_run(tmp_path / "full", cache_dir)
  train(full, progress=False)
  # The same run stopped at step 7 (between checkpoints), then resumed by the same command.
  split = tiny_run(tmp_path / "split", cache_dir)
  trainer = Trainer(split, progress=False)
  trainer.run(until=7)
  trainer.close()
  # Rows written after the checkpoint it resumes from must not survive: pretend a crash wrote some.
  with open(tmp_path / "split" / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": 8, "tokens": 0, "loss": 123.0}) + "\n")
  train(split, progress=False)
  # The row lists, in file order: a stale or replayed step logged twice must show.
  def rows(run_dir):
    return [(row["step"], row["loss"]) for row in map(json.loads, (
        run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
  expected, resumed = rows(tmp_path / "full"), rows(tmp_path / "split")
  assert [step for step, _ in expected] == list(range(1, 13))
  assert resumed == expected


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path, cache_dir, monkeypatch):
  cfg = tiny_run(tmp_path / "run", cache_dir, steps=12, ckpt_every=4, eval_every=100)
  trainer = Trainer(cfg, progress=False)
  real_step = trainer.train_step

  def poisoned(state, batch):  # from step 6 on, the loss is NaN
    state, metrics = real_step(state, batch)
    bad = state.step >= 6
    return state, metrics | {"loss": jnp.where(bad, jnp.nan, metrics["loss"])}

  trainer.train_step = poisoned
  with pytest.raises(TrainingDivergedError, match=r"step 6.*last good checkpoint \(step 4\)"):
    trainer.run()
  trainer.close()
  assert ckpt.RunCheckpoints(tmp_path / "run").periodic.all_steps() == [4]


def test_corrupt_latest_checkpoint_falls_back_and_is_kept(tmp_path, cache_dir):
  cfg = tiny_run(tmp_path / "run", cache_dir, steps=8, ckpt_every=4, eval_every=4)
  train(cfg, progress=False)
  rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  best_val = min(row["val_loss"] for row in map(json.loads, rows) if "val_loss" in row)
  latest = tmp_path / "run" / "checkpoints" / "8"
  for path in (latest / "state").rglob("*"):
    if path.is_file() and path.stat().st_size > 0 and "metadata" not in path.name:
      path.write_bytes(b"\0garbage")
  trainer = Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=12)),
                    progress=False)
  assert trainer.step == 4  # step 8 unreadable: resumed from the one before
  # Kept, but out of the way: step 8 is no longer the latest, and can be saved again.
  assert not latest.exists() and (tmp_path / "run" / "unreadable" / "checkpoints-8").is_dir()
  assert trainer.checkpoints.latest_step() == 4
  # The best checkpoint (from step 4 or 8) still sets the bar for replacing it.
  assert trainer.best_val == best_val
  trainer.run()
  trainer.close()
  assert ckpt.RunCheckpoints(tmp_path / "run").periodic.all_steps() == [4, 8, 12]
  weights.load_checkpoint(tmp_path / "run")  # every step readable again


def test_fresh_run_sets_old_metrics_aside(tmp_path, cache_dir):
  """Rows of an attempt that crashed before its first checkpoint must not mix into a new run."""
  (tmp_path / "run").mkdir()
  old_rows = json.dumps({"step": 1, "tokens": 0, "loss": 99.0}) + "\n"
  (tmp_path / "run" / "metrics.jsonl").write_text(old_rows)
  train(tiny_run(tmp_path / "run", cache_dir, steps=2, eval_every=2, ckpt_every=2), progress=False)
  assert sorted(step_losses(tmp_path / "run")) == [1, 2]
  assert 99.0 not in step_losses(tmp_path / "run").values()
  assert (tmp_path / "run" / "metrics.previous-1.jsonl").read_text() == old_rows


def test_gpt2_run_checkpoints_load_and_resume(tmp_path, cache_dir):
  """GPT-2 keeps dropout RNG keys in its state: they must survive a save and a restore."""
  cfg = gpt2_twin(tiny_run(tmp_path / "run", cache_dir, steps=4, eval_every=4, ckpt_every=2))
  cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
  trainer = Trainer(cfg, progress=False)
  trainer.run(until=2)
  trainer.close()
  train(cfg, progress=False)  # resumes from step 2
  model, tokenizer = weights.load_checkpoint(tmp_path / "run")
  assert type(model).__name__ == "Gpt2"
  assert sorted(step_losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_resume_refuses_a_different_model_or_data_position(tmp_path, cache_dir):
  cfg = tiny_run(tmp_path / "run", cache_dir, steps=4)
  train(cfg, progress=False)
  other = dataclasses.replace(cfg, model=cfg.model.replace(hidden_size=64))
  with pytest.raises(ValueError, match="different model config"):
    Trainer(other, progress=False)
  # The saved data position counts batches of one size in one seed's order.
  for change in ({"batch_size": 16}, {"seed": 7}, {"context_len": 16}):
    with pytest.raises(ValueError, match="different train config"):
      Trainer(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **change)),
              progress=False)
  # A new learning rate and more steps resume (what the divergence message advises).
  trainer = Trainer(dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e-3),
                                        train=dataclasses.replace(cfg.train, steps=8)),
                    progress=False)
  assert trainer.step == 4
  trainer.close()


def test_too_few_validation_windows_fail_before_training(tmp_path, cache_dir):
  cfg = tiny_run(tmp_path / "run", cache_dir)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_windows=4))
  with pytest.raises(ValueError, match=r"only 4 \(data.val_windows=4"):
    Trainer(cfg, progress=False)
  assert not (tmp_path / "run" / "checkpoints").exists() or not any(
      (tmp_path / "run" / "checkpoints").iterdir())


def _train_command(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
  return [sys.executable, "-c", "import sys; from tests.train_helpers import tiny_run; "
          "from nanogptoss_jax.training.config_files import apply_overrides; from nanogptoss_jax.training.loop import train; "
          f"train(apply_overrides(tiny_run({str(run_dir)!r}, {str(cache_dir)!r}), sys.argv[1:]), progress=False)",
          *overrides]


def test_sigterm_saves_and_exits_cleanly(tmp_path, cache_dir):
  run_dir = tmp_path / "run"
  # Many steps, rare checkpoints: whatever step SIGTERM lands on must still be saved.
  cmd = _train_command(run_dir, cache_dir, "train.steps=100000", "train.ckpt_every=100000",
                       "train.eval_every=100000", "train.log_every=1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=os.environ | {"JAX_PLATFORMS": "cpu"})
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  steps = ckpt.RunCheckpoints(run_dir).periodic.all_steps()
  assert steps and steps[-1] >= 3


def test_eight_devices_match_one_device(tmp_path, cache_dir):
  """The same run on 8 forced host devices (4 data x 2 fsdp) gives the same per-step losses."""
  one = tiny_run(tmp_path / "one", cache_dir, steps=6, eval_every=6, ckpt_every=6)
  train(one, progress=False)
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                      "JAX_PLATFORMS": "cpu"}
  cmd = _train_command(tmp_path / "eight", cache_dir, "train.steps=6", "train.eval_every=6",
                       "train.ckpt_every=6", "execution.fsdp=2")
  subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600)
  expected, sharded = step_losses(tmp_path / "one"), step_losses(tmp_path / "eight")
  assert sorted(expected) == sorted(sharded)
  np.testing.assert_allclose([sharded[s] for s in sorted(sharded)],
                             [expected[s] for s in sorted(expected)], rtol=2e-5)


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path, cache_dir):
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                      "JAX_PLATFORMS": "cpu"}
  cmd = _train_command(tmp_path / "run", cache_dir, "train.batch_size=3")
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert "micro-batch of train.batch_size=3 / train.grad_accum=1 = 3 rows cannot be split " \
         "evenly over 2 devices" in result.stderr
