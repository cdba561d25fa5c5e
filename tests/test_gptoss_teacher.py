"""gpt-oss as a teacher, end to end: a tiny synthetic checkpoint in OpenAI's published layout
(MXFP4 experts, kept 4-bit) teaches a nano-shaped compact-vocabulary student online and from an
offline cache; its full-o200k ids reach the student's through the compact table."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.pretrained.load import load_pretrained
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.distillation import vocab_map
from nanogptoss_jax.training.loop import Trainer
from nanogptoss_jax.training.teacher_cache import precompute
from tests.pretrained_helpers import write_original
from tests.train_helpers import TINY_VOCAB, tiny_run

torch = pytest.importorskip("torch")
F = torch.nn.functional
ALPHA, TAU = 0.7, 1.5
FEW_STORIES = 20  # a small stream, so a cache of every id (k = V) stays a few MB


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  root = tmp_path_factory.mktemp("gptoss")
  write_original(str(root / "teacher"))
  return root


def student(root, name, **changes):
  cfg = tiny_run(root / name, root / "cache", teacher=str(root / "teacher"), kd_alpha=ALPHA,
                 kd_temperature=TAU, steps=3, eval_every=3, ckpt_every=3, sample_tokens=0,
                 **changes)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_stories=FEW_STORIES))


def folded_reference(teacher_logits: np.ndarray, mapping: np.ndarray) -> np.ndarray:
  """Teacher log-probs on the student's ids: each teacher id's probability added onto its
  mapped id, in float64 numpy; -1e30 where nothing lands (a finite stand-in for log 0)."""
  logits = np.asarray(teacher_logits, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  folded = np.zeros((*p.shape[:-1], TINY_VOCAB))
  for teacher_id, student_id in enumerate(mapping):
    folded[..., student_id] += p[..., teacher_id]
  return np.where(folded > 0, np.log(np.maximum(folded, 1e-300)), -1e30)


def torch_kd(student_logits, teacher_log_probs, labels) -> float:
  s, t = (torch.tensor(np.asarray(x), dtype=torch.float64) for x in (student_logits,
                                                                     teacher_log_probs))
  ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.tensor(np.asarray(labels),
                                                                dtype=torch.long).reshape(-1))
  kl = F.kl_div(F.log_softmax(s / TAU, -1), F.log_softmax(t / TAU, -1), reduction="none",
                log_target=True).sum(-1).mean()
  return float((1 - ALPHA) * ce + ALPHA * TAU ** 2 * kl)


@pytest.fixture(scope="module")
def online(published):
  """An online run's first batch, its loss, the torch reference for it, and its teacher."""
  trainer = Trainer(student(published, "online"), progress=False)
  teacher, teacher_tokenizer = load_pretrained(str(published / "teacher"), mxfp4="keep",
                                               dtype="float32")
  mapping = vocab_map(teacher_tokenizer, trainer.tokenizer, teacher.cfg.vocab_size)
  batch = trainer._next_batch()
  windows = np.asarray(batch[0])
  want = torch_kd(trainer.model()(windows[:, :-1]),
                  folded_reference(teacher(windows[:, :-1]), mapping), windows[:, 1:])
  trainer.state, metrics = trainer.train_step(trainer.state, batch)
  experts = [v.get_value() for path, v in nnx.to_flat_state(trainer.distill.teacher_state)
             if "mlp1" in ".".join(map(str, path))]
  trainer.run()
  trainer.close()
  rows = [json.loads(line) for line in (published / "online" / "metrics.jsonl").open()]
  return dict(windows=windows, loss=float(metrics["loss"]), want=want, mapping=mapping,
              experts=experts, rows=[row for row in rows if "loss" in row])


def test_a_published_mxfp4_teacher_distils_online(online):
  assert online["experts"] and any(v.dtype == jnp.uint8 for v in online["experts"])  # 4-bit
  assert not np.array_equal(online["mapping"], np.arange(TINY_VOCAB))  # a real fold
  np.testing.assert_allclose(online["loss"], online["want"], rtol=2e-5)
  assert [row["step"] for row in online["rows"]] == [2, 3]  # run() logs the steps it took
  assert all(np.isfinite(row["loss"]) and row["kl"] >= 0 for row in online["rows"])


def test_online_equals_an_offline_top_k_cache_of_every_id(published, online):
  """k = V: the renormalised top-k is the whole distribution, so the two losses agree."""
  offline = student(published, "offline", kd_mode="top_k", kd_k=TINY_VOCAB)
  folder = precompute(offline, progress=False)
  meta = json.loads((folder / "meta.json").read_text())
  assert meta["teacher"] == weights.describe_source(str(published / "teacher"))
  trainer = Trainer(offline, progress=False)
  batch = trainer._next_batch()
  trainer.state, metrics = trainer.train_step(trainer.state, batch)
  trainer.close()
  np.testing.assert_array_equal(np.asarray(batch["inputs"][0]), online["windows"][:, :-1])
  np.testing.assert_allclose(float(metrics["loss"]), online["loss"], rtol=1e-6)
