"""Distillation in the trainer (training/teacher.py, teacher_cache.py): the online step's loss is
the KD loss torch computes on the same logits, the teacher never changes, resumes are exact, and
an offline cache holds the teacher's rows by window and refuses another teacher in one line."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.data.streams import prepare_data
from nanogptoss_jax.data.teacher_rows import TeacherCacheError
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.loop import Trainer, train
from nanogptoss_jax.training.teacher_cache import precompute, rows_function
from tests.train_helpers import tiny_run

torch = pytest.importorskip("torch")
F = torch.nn.functional
ALPHA, TAU, K = 0.6, 2.0, 8


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A finished tiny run: the teacher of every student here."""
  root = tmp_path_factory.mktemp("teacher")
  cfg = tiny_run(root / "teacher", root / "cache", steps=6, eval_every=6, ckpt_every=6,
                 sample_tokens=0)
  train(cfg, progress=False)
  return cfg


def student(teacher, run_dir, **changes):
  changes = dict(teacher=str(teacher.run_dir), kd_alpha=ALPHA, kd_temperature=TAU, kd_k=K,
                 seed=3, steps=4, eval_every=4, ckpt_every=2, sample_tokens=0) | changes
  return tiny_run(run_dir, teacher.data.cache_dir, **changes)


def losses(run_dir) -> list[float]:
  rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
  return [row["loss"] for row in rows if "loss" in row]


def torch_kd(student_logits, teacher_logits, labels, alpha=ALPHA, tau=TAU) -> float:
  """(1 - alpha) CE + alpha tau^2 KL, every token counted once, in float64 torch."""
  s, t = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (student_logits,
                                                                     teacher_logits))
  ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.tensor(np.asarray(labels),
                                                                dtype=torch.long).reshape(-1))
  kl = F.kl_div(F.log_softmax(s / tau, -1), F.log_softmax(t / tau, -1), reduction="none",
                log_target=True).sum(-1).mean()
  return float((1 - alpha) * ce + alpha * tau ** 2 * kl)


def log_softmax(x):
  x = np.asarray(x, np.float64)
  return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)


def flat(tree) -> dict:
  return {path: np.array(v.get_value() if hasattr(v, "get_value") else v)
          for path, v in nnx.to_flat_state(tree)}


def test_online_is_the_kd_loss_leaves_the_teacher_alone_and_resumes_loss_for_loss(
    teacher_run, tmp_path):
  """The first step's loss is torch's KD loss on the student's and the teacher's logits; after
  the run the teacher's weights are still those on disk; a run stopped and resumed gives the
  same losses, its checkpoints hold no teacher but its hash, and a changed teacher stops it."""
  trainer = Trainer(student(teacher_run, tmp_path / "whole"), progress=False)
  teacher, _ = weights.load_checkpoint(teacher_run.run_dir)
  start = trainer.data_iter.get_state()
  windows = np.asarray(trainer._next_batch()[0])  # [B, T + 1]
  trainer.data_iter.set_state(start)  # run() draws the same batch first
  want = torch_kd(trainer.model()(windows[:, :-1]), teacher(windows[:, :-1]), windows[:, 1:])
  trainer.run()
  after = flat(trainer.distill.teacher_state)
  trainer.close()
  whole = losses(tmp_path / "whole")
  np.testing.assert_allclose(whole[0], want, rtol=2e-5)
  assert whole[-1] < whole[0]  # the student learns from it
  on_disk = flat(nnx.state(teacher))
  assert after.keys() == on_disk.keys()
  for path, value in on_disk.items():
    np.testing.assert_array_equal(after[path], value, err_msg=str(path))

  split = student(teacher_run, tmp_path / "split")
  trainer = Trainer(split, progress=False)
  trainer.run(until=2)
  trainer.close()
  saved = json.loads(next((tmp_path / "split" / "checkpoints" / "2").rglob("_METADATA"))
                     .read_text())["tree_metadata"]
  assert not [key for key in saved if "teacher" in key]  # the teacher is not in the state
  _, _, _, meta = ckpt.restore(ckpt.read_only_manager(tmp_path / "split" / "checkpoints"), None,
                               meta_only=True)
  assert meta[ckpt.SOURCE_KEY]["teacher"] == weights.describe_source(teacher_run.run_dir)
  train(split, progress=False)
  assert losses(tmp_path / "split") == whole
  sealed = next((Path(teacher_run.run_dir) / "best").glob("*/checksums.json"))
  original = sealed.read_text()
  longer = dataclasses.replace(split, train=dataclasses.replace(split.train, steps=6))
  try:
    sealed.write_text(original.replace("{", '{"x": "y", ', 1))
    with pytest.raises(UserError, match=r"^train\.teacher=.* changed since this run started"):
      Trainer(longer, progress=False)
  finally:
    sealed.write_text(original)
  assert (tmp_path / "split" / "checkpoints" / "4").is_dir()  # nothing deleted


@pytest.fixture(scope="module")
def top_k_cache(teacher_run, tmp_path_factory):
  cfg = student(teacher_run, tmp_path_factory.mktemp("offline") / "run", kd_mode="top_k")
  return cfg, precompute(cfg, batch_windows=64, progress=False)


def test_a_top_k_cache_holds_each_windows_teacher_rows(teacher_run, top_k_cache):
  cfg, folder = top_k_cache
  meta = json.loads((folder / "meta.json").read_text())
  count, length, k = meta["shape"]
  assert (length, k) == (cfg.train.context_len, K)
  trainer = Trainer(cfg, progress=False)
  ids = np.asarray(trainer.data.train_stream.ids)
  teacher, _ = weights.load_checkpoint(teacher_run.run_dir)
  windows = np.array([0, 1, count // 2, count - 1])
  inputs = ids[windows[:, None] * length + np.arange(length)].astype(np.int32)
  every = log_softmax(teacher(inputs))  # [n, T, V]
  cached = trainer.distill.rows.rows(windows)
  np.testing.assert_allclose(cached["teacher_log_probs"], -np.sort(-every, -1)[..., :K],
                             atol=2e-5)
  np.testing.assert_allclose(np.take_along_axis(every, cached["teacher_ids"], -1),
                             cached["teacher_log_probs"], atol=2e-5)
  # The trainer's batches carry the rows of their own windows.
  batch = trainer._next_batch()
  trainer.close()
  inputs = np.asarray(batch["inputs"][0])
  np.testing.assert_allclose(np.asarray(batch["teacher_log_probs"][0]),
                             -np.sort(-log_softmax(teacher(inputs)), -1)[..., :K], atol=2e-5)


def test_offline_resumes_loss_for_loss_and_refuses_a_changed_teacher(teacher_run, top_k_cache,
                                                                      tmp_path):
  cfg, folder = top_k_cache
  whole = dataclasses.replace(cfg, run_dir=str(tmp_path / "whole"))
  split = dataclasses.replace(cfg, run_dir=str(tmp_path / "split"))
  train(whole, progress=False)
  trainer = Trainer(split, progress=False)
  trainer.run(until=2)
  trainer.close()
  train(split, progress=False)
  assert losses(tmp_path / "split") == losses(tmp_path / "whole")
  assert all(np.isfinite(losses(tmp_path / "whole")))
  sealed = next((Path(teacher_run.run_dir) / "best").glob("*/checksums.json"))
  original = sealed.read_text()
  before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir())
  try:
    sealed.write_text(original.replace("{", '{"x": "y", ', 1))
    with pytest.raises(TeacherCacheError, match="was made by a teacher hashing") as error:
      Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "new")), progress=False)
  finally:
    sealed.write_text(original)
  assert "\n" not in str(error.value)
  assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before
  # Asking for the same cache again finds it: the same folder, not one byte rewritten.
  assert precompute(cfg, batch_windows=64, progress=False) == folder
  assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.iterdir()) == before


def test_a_cache_for_an_online_run_is_one_line(teacher_run, tmp_path):
  with pytest.raises(UserError, match="needs train.teacher and train.kd_mode top_k or sampled"
                     ) as error:
    precompute(student(teacher_run, tmp_path / "online"), progress=False)
  assert "\n" not in str(error.value)


def test_sampled_rows_follow_their_window_and_train_as_the_estimator_says(teacher_run,
                                                                         tmp_path):
  """Each window's draws depend on its index alone (not on how the precompute batches), and a
  step's loss is (1 - a) CE + a tau^2 mean over draws of log p - log s_tau at the drawn ids."""
  cfg = student(teacher_run, tmp_path / "sampled", kd_mode="sampled")
  teacher, _ = weights.load_checkpoint(teacher_run.run_dir)
  graphdef, state = nnx.split(teacher)
  rows = rows_function(graphdef, None, cfg)
  windows = np.arange(5, 11)
  length = cfg.train.context_len
  ids = np.asarray(prepare_data(teacher_run.data)[1].ids)
  inputs = ids[windows[:, None] * length + np.arange(length)].astype(np.int32)
  together = jax.device_get(rows(state, inputs, windows))
  apart = [jax.device_get(rows(state, inputs[i:i + 2], windows[i:i + 2])) for i in (0, 2, 4)]
  for name, value in together.items():  # the same draws (log-probs to float rounding)
    np.testing.assert_allclose(np.concatenate([part[name] for part in apart]), value,
                               rtol=0, atol=0 if name == "ids" else 1e-5)
  # The draws follow the teacher: log p at each drawn id is the teacher's own log-prob there.
  np.testing.assert_allclose(together["log_probs"], np.take_along_axis(
      log_softmax(np.asarray(teacher(inputs)) / TAU), together["ids"], -1), atol=2e-5)

  # Training reads a cache of a few stories' windows (drawing k ids per token takes time).
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_stories=20))
  precompute(cfg, batch_windows=64, progress=False)
  trainer = Trainer(cfg, progress=False)
  batch = trainer._next_batch()
  inputs, targets = (np.asarray(batch[key][0]) for key in ("inputs", "targets"))
  student_logits = np.asarray(trainer.model()(inputs), np.float64)
  trainer.state, metrics = trainer.train_step(trainer.state, batch)
  trainer.close()
  s = torch.tensor(student_logits)
  ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.tensor(targets, dtype=torch.long)
                       .reshape(-1))
  log_s = F.log_softmax(s / TAU, -1).gather(-1, torch.tensor(
      np.asarray(batch["teacher_ids"][0]), dtype=torch.long))
  log_p = torch.tensor(np.asarray(batch["teacher_log_probs"][0]), dtype=torch.float64)
  want = (1 - ALPHA) * ce + ALPHA * TAU ** 2 * (log_p - log_s).mean()
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=2e-5)
