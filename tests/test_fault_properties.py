"""What a run promises and no other test pins: loaded weights are the trained ones, best/ holds
the lowest validation loss, pruning keeps the newest N, metrics rows carry their documented
fields, stale rows are replayed loss for loss, GPT-2's dropout stream resumes, SIGTERM/SIGINT
save the last logged step, NaN/Inf stop loudly, a missing hub dataset is one line."""

import dataclasses
import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.loop import Trainer, TrainingDivergedError
from nanogptoss_jax.training.run_config import gpt2_twin
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
KEEP = 2
_STEPS = {}  # config (without run_dir) -> (train_step, eval_step): compiled once per module


def _config(run_dir, cache_dir, **changes):
  return tiny_run(run_dir, cache_dir, **({"steps": 12, "ckpt_every": 2, "eval_every": 4,
                                          "keep_checkpoints": KEEP} | changes))


def _trainer(cfg) -> Trainer:
  """A Trainer reusing the jitted steps of an earlier one with the same config (same closure
  contents), so the module compiles once."""
  trainer = Trainer(cfg, progress=False)
  key = repr(dataclasses.replace(cfg, run_dir=""))
  if key in _STEPS:
    trainer.train_step, trainer.eval_step = _STEPS[key]
  else:
    _STEPS[key] = trainer.train_step, trainer.eval_step
  return trainer


def _params(tree) -> list[np.ndarray]:
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _snapshot_saves(trainer: Trainer) -> dict[int, list[np.ndarray]]:
  """step -> the trainer's params at each save, taken as it saves them."""
  saved, real_save = {}, trainer._save

  def save(*args, **kwargs):
    saved[trainer.step] = _params(trainer.state.params)
    real_save(*args, **kwargs)

  trainer._save = save
  return saved


def _rows(run_dir: Path) -> list[dict]:
  """Every row in file order, without the timing (which differs run to run)."""
  return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
          for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _load_params(run_dir: Path):
  model, _ = weights.load_checkpoint(run_dir)
  return _params(nnx.state(model, nnx.Param))


def _equal(a, b) -> bool:
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("token-cache")


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, cache_dir):
  """One uninterrupted run: (run_dir, its rows, step -> params at each save)."""
  run_dir = tmp_path_factory.mktemp("props") / "baseline"
  trainer = _trainer(_config(run_dir, cache_dir))
  saved = _snapshot_saves(trainer)
  trainer.run()
  trainer.close()
  return run_dir, _rows(run_dir), saved


def test_loaded_weights_are_the_trained_ones_and_best_has_the_lowest_val_loss(baseline):
  run_dir, rows, saved = baseline
  evals = {row["step"]: row["val_loss"] for row in rows if "val_loss" in row}
  best_step = min(evals, key=evals.get)
  assert [p.name for p in (run_dir / ckpt.BEST_DIR).iterdir() if p.name.isdigit()] == \
      [str(best_step)]
  assert _equal(_load_params(run_dir), saved[best_step])  # load_checkpoint reads best/
  assert not _equal(saved[best_step], saved[min(saved)])  # training moved the weights
  newest = ckpt.read_only_manager(run_dir / ckpt.PERIODIC_DIR)
  model, _ = weights.load_step(newest, 12)
  assert _equal(_params(nnx.state(model, nnx.Param)), saved[12])


def test_only_the_newest_checkpoints_are_kept(baseline):
  run_dir, _, saved = baseline
  assert sorted(saved) == [2, 4, 6, 8, 10, 12]  # every ckpt_every and every eval step
  periodic = sorted(int(p.name) for p in (run_dir / ckpt.PERIODIC_DIR).iterdir()
                    if p.name.isdigit())
  assert periodic == sorted(saved)[-KEEP:]


def test_metrics_rows_have_their_documented_fields(baseline):
  run_dir, _, _ = baseline
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  steps = [row for row in rows if "loss" in row]
  evals = [row for row in rows if "val_loss" in row]
  assert [row["step"] for row in steps] == list(range(1, 13))
  assert [row["step"] for row in evals] == [4, 8, 12]
  layers, experts = 2, 4
  for row in steps:  # loss, lr, grad norm, tokens/s, MoE losses, expert load
    assert row["tokens"] == row["step"] * 8 * 32
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "load_balance_loss", "router_z_loss"):
      assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, key
    assert row["load_balance_loss"] >= 1.0 - 1e-4  # E * sum f_e p_e >= 1 for top-k routing
    load = np.asarray(row["expert_load"])
    assert load.shape == (layers, experts)
    np.testing.assert_allclose(load.sum(-1), 1.0, atol=1e-3)  # fractions of the assignments
  for row in evals:  # val loss, bits per byte, the train loss since the last eval, a sample
    assert row["val_loss"] > 0 and row["val_bpb"] > 0 and row["train_loss"] > 0
    assert isinstance(row["sample"], str)
    window = [r["loss"] for r in steps if row["step"] - 4 < r["step"] <= row["step"]]
    assert row["train_loss"] == pytest.approx(np.mean(window), rel=1e-12)


def test_a_crash_after_a_checkpoint_replays_its_steps_loss_for_loss(baseline, cache_dir, tmp_path):
  _, base_rows, _ = baseline
  run_dir = tmp_path / "run"
  trainer = _trainer(_config(run_dir, cache_dir))

  def crash():  # at step 8's eval: rows 7 and 8 are written, the newest checkpoint is step 6
    raise RuntimeError("simulated crash")

  trainer.evaluate = lambda: crash() if trainer.step == 8 else Trainer.evaluate(trainer)
  with pytest.raises(RuntimeError, match="simulated crash"):
    trainer.run()
  trainer.close()
  assert [row["step"] for row in _rows(run_dir)][-2:] == [7, 8]
  assert ckpt.RunCheckpoints(run_dir).latest_step() == 6
  resumed = _trainer(_config(run_dir, cache_dir))
  resumed.run()
  resumed.close()
  assert _rows(run_dir) == base_rows  # the list: a step logged twice would show


def test_gpt2_with_dropout_resumes_loss_for_loss(tmp_path, cache_dir):
  def config(run_dir):
    cfg = gpt2_twin(tiny_run(run_dir, cache_dir, steps=4, eval_every=4, ckpt_every=2))
    return dataclasses.replace(cfg, run_dir=str(run_dir),
                               model=dataclasses.replace(cfg.model, dropout=0.3))

  full = _trainer(config(tmp_path / "full"))
  full.run()
  full.close()
  split = _trainer(config(tmp_path / "split"))
  split.run(until=2)
  split.close()
  resumed = _trainer(config(tmp_path / "split"))
  assert resumed.step == 2
  resumed.run()
  resumed.close()
  assert _rows(tmp_path / "split") == _rows(tmp_path / "full")
  # Dropout is really on: the same weights give another train loss with another dropout key.
  trainer = _trainer(config(tmp_path / "other"))
  trainer.state = dataclasses.replace(trainer.state, rest=jax.tree.map(
      lambda x: jax.random.fold_in(x, 1) if ckpt._is_key(x) else x, trainer.state.rest))
  trainer.run(until=1)
  trainer.close()
  assert _rows(tmp_path / "other")[0]["loss"] != _rows(tmp_path / "full")[0]["loss"]


@pytest.mark.parametrize("poison", [("loss", jnp.inf), ("grad_norm", jnp.nan),
                                    ("grad_norm", jnp.inf)])
def test_inf_or_nan_stops_loudly_and_keeps_a_loadable_checkpoint(poison, baseline, cache_dir,
                                                                tmp_path):
  key, value = poison
  trainer = _trainer(_config(tmp_path / "run", cache_dir, ckpt_every=4, eval_every=100))
  saved = _snapshot_saves(trainer)
  real_step = trainer.train_step

  def poisoned(state, batch):  # from step 6 on, the metric is Inf / NaN
    state, metrics = real_step(state, batch)
    return state, metrics | {key: jnp.where(state.step >= 6, value, metrics[key])}

  trainer.train_step = poisoned
  with pytest.raises(TrainingDivergedError, match=r"step 6.*last good checkpoint \(step 4\)") \
      as error:
    trainer.run()
  trainer.close()
  assert "\n" not in str(error.value)  # the one line cli.run prints
  assert ckpt.RunCheckpoints(tmp_path / "run").periodic.all_steps() == [4]
  assert _equal(_load_params(tmp_path / "run"), saved[4])


def _command(run_dir: Path, cache_dir: Path) -> list[str]:
  return [sys.executable, "-c", "from tests.train_helpers import tiny_run; "
          "from nanogptoss_jax.training.loop import train; "
          f"train(tiny_run({str(run_dir)!r}, {str(cache_dir)!r}, steps=100000, "
          "ckpt_every=100000, eval_every=100000), progress=False)"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_last_logged_step_and_the_run_resumes_there(sig, tmp_path, cache_dir):
  run_dir = tmp_path / "run"
  env = os.environ | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
                      "JAX_COMPILATION_CACHE_DIR": str(cache_dir / "jax-cache"),
                      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  proc = subprocess.Popen(_command(run_dir, cache_dir), cwd=REPO, env=env,
                          stderr=subprocess.PIPE, text=True)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and
                                        len(metrics.read_text().splitlines()) >= 3):
    time.sleep(0.2)
  proc.send_signal(sig)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  saved = ckpt.RunCheckpoints(run_dir).periodic.all_steps()
  logged = [row["step"] for row in _rows(run_dir)]
  assert len(saved) == 1 and saved[0] == logged[-1] >= 3, (saved, logged)
  assert f"stopped: step {saved[0]} saved" in stderr
  cfg = tiny_run(run_dir, cache_dir, steps=100000, ckpt_every=100000, eval_every=100000)
  resumed = Trainer(cfg, progress=False)
  assert resumed.step == saved[0]
  resumed.close()


class _NotFound(http.server.BaseHTTPRequestHandler):
  paths = []  # every path asked for: proves the client reached the stub

  def _answer(self):
    self.paths.append(self.path)
    self.send_response(404)
    self.send_header("Content-Type", "application/json")
    body = b'{"error": "Repository not found"}'
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  do_GET = do_HEAD = do_POST = _answer

  def log_message(self, *args):  # quiet
    pass


def test_a_hub_dataset_that_does_not_exist_is_one_line(tmp_path):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT":
           f"http://127.0.0.1:{server.server_address[1]}", "HF_HOME": str(tmp_path / "hf")}
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "NANOGPTOSS_DEBUG"):
      env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/nano.py",
         "--config.data.path=nobody/no-such-dataset", f"--config.data.cache_dir={tmp_path}/c",
         f"--config.run_dir={tmp_path}/run"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=120)
  finally:
    server.shutdown()
  assert result.returncode == 1, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "nobody/no-such-dataset" in errors[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert any("no-such-dataset" in path for path in _NotFound.paths), _NotFound.paths
