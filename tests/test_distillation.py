"""Distillation losses (training/distillation.py) against closed forms, torch, and statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogptoss_jax.data.bpe import base_encoding
from nanogptoss_jax.data.tokenizer import (CompactTokenizer, FullTokenizer, byte_base_ids,
                                           named_special_base_ids)
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.training import distillation as kd

torch = pytest.importorskip("torch")
F = torch.nn.functional
B, T, V = 3, 5, 11


def random_case(seed: int, vocab: int = V):
  rng = np.random.default_rng(seed)
  student = rng.normal(0, 2, (B, T, vocab)).astype(np.float32)
  teacher = rng.normal(0, 2, (B, T, vocab)).astype(np.float32)
  labels = rng.integers(0, vocab, (B, T)).astype(np.int32)
  return student, teacher, labels


def torch_loss(student, teacher, labels, weights, alpha, temperature):
  """The loss written with torch's own kl_div and cross_entropy, in float64; and its gradient."""
  s = torch.tensor(student, dtype=torch.float64, requires_grad=True)
  t = torch.tensor(teacher, dtype=torch.float64)
  w = torch.tensor(weights, dtype=torch.float64)
  kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                reduction="none", log_target=True).sum(-1)
  ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), torch.tensor(labels, dtype=torch.long).reshape(
      -1), reduction="none").reshape(kl.shape)
  loss = (w * ((1 - alpha) * ce + alpha * temperature ** 2 * kl)).sum() / w.sum()
  loss.backward()
  return loss.item(), s.grad.numpy()


def ours(student, labels, weights, teacher, alpha, temperature):
  def loss(s):
    return kd.distillation_loss(s, jnp.asarray(labels), jnp.asarray(weights), teacher,
                                alpha=alpha, temperature=temperature)[0]
  value, grad = jax.value_and_grad(loss)(jnp.asarray(student))
  return float(value), np.asarray(grad)


def test_kl_closed_form():
  # p = (1/4, 3/4) against a uniform student: KL = 1/4 ln(1/2) + 3/4 ln(3/2).
  teacher = kd.DenseTeacher(jnp.asarray([[[0.0, np.log(3.0)]]]))
  got = float(teacher.kl(jnp.zeros((1, 1, 2)), 1.0)[0, 0])
  assert got == pytest.approx(0.25 * np.log(0.5) + 0.75 * np.log(1.5), rel=1e-6)
  # At tau = 2 the teacher is softmax(logits / 2) = (1, sqrt 3) / (1 + sqrt 3).
  p = np.array([1.0, np.sqrt(3.0)]) / (1 + np.sqrt(3.0))
  got = float(teacher.kl(jnp.zeros((1, 1, 2)), 2.0)[0, 0])
  assert got == pytest.approx(np.sum(p * np.log(p / 0.5)), rel=1e-6)
  # Random logits against sum p (log p - log q) in float64.
  student, teacher_logits, _ = random_case(0)
  for tau in (0.5, 1.0, 3.0):
    def log_softmax(x):
      x = x.astype(np.float64) / tau
      return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
          -1, keepdims=True)
    want = np.sum(np.exp(log_softmax(teacher_logits)) * (log_softmax(teacher_logits)
                                                        - log_softmax(student)), -1)
    got = kd.DenseTeacher(jnp.asarray(teacher_logits)).kl(jnp.asarray(student), tau)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha,temperature", [(0.0, 1.0), (0.5, 2.0), (1.0, 0.7), (0.3, 4.0)])
def test_loss_and_gradient_match_torch(alpha, temperature):
  student, teacher, labels = random_case(1)
  weights = np.random.default_rng(2).uniform(0, 2, (B, T)) * (np.arange(T) % 3 != 0)
  want, want_grad = torch_loss(student, teacher, labels, weights, alpha, temperature)
  got, got_grad = ours(student, labels, weights, kd.DenseTeacher(jnp.asarray(teacher)), alpha,
                       temperature)
  assert got == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-7)


MASKS = {
    "all": np.ones((B, T)),
    "prefix": np.arange(T)[None].repeat(B, 0) < 2,
    "suffix": np.arange(T)[None].repeat(B, 0) >= 3,
    "random": np.random.default_rng(3).random((B, T)) < 0.5,
    "one row empty": np.ones((B, T)) * (np.arange(B)[:, None] != 1),
    "none": np.zeros((B, T)),
}


@pytest.mark.parametrize("shape", MASKS)
def test_masked_tokens_never_count(shape):
  mask = MASKS[shape].astype(np.float32)
  student, teacher, labels = random_case(4)
  alpha, tau = 0.6, 2.0
  # Masked tokens hold garbage: NaN logits for both models, labels out of range.
  dirty = lambda x, fill: np.where(mask[..., None] > 0, x, fill).astype(x.dtype)
  student_dirty, teacher_dirty = dirty(student, np.nan), dirty(teacher, np.nan)
  labels_dirty = np.where(mask > 0, labels, -7).astype(np.int32)
  got, got_grad = ours(student_dirty, labels_dirty, mask, kd.DenseTeacher(
      jnp.asarray(teacher_dirty)), alpha, tau)
  assert np.isfinite(got) and np.all(np.isfinite(got_grad))
  assert np.all(got_grad[mask == 0] == 0)
  if mask.sum() == 0:
    assert got == 0
    return
  # torch on the kept tokens alone, as a batch of one row.
  keep = mask > 0
  want, want_grad = torch_loss(student[keep][None], teacher[keep][None], labels[keep][None],
                               np.ones((1, keep.sum())), alpha, tau)
  assert got == pytest.approx(want, rel=1e-5)
  np.testing.assert_allclose(got_grad[keep], want_grad[0], rtol=1e-4, atol=1e-7)
  # The sparse teachers too: garbage ids and log-probs on masked tokens change nothing.
  rng = np.random.default_rng(5)
  for clean in (kd.top_k_teacher(jnp.asarray(teacher), 4),
                kd.sample_teacher(jax.random.key(0), jnp.asarray(teacher), 6, tau)):
    garbage = jax.tree.map(lambda x: jnp.where(
        jnp.asarray(mask > 0).reshape(B, T, 1), x, jnp.asarray(
            rng.integers(-10**6, 10**6, x.shape) if x.dtype.kind == "i" else np.nan, x.dtype)),
        clean)
    want = ours(student, labels, mask, clean, alpha, tau)
    got = ours(student_dirty, labels_dirty, mask, garbage, alpha, tau)
    assert got[0] == want[0] and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("shape", MASKS)
def test_masked_mean_reads_only_weighted_tokens(shape):
  weights = MASKS[shape] * np.random.default_rng(11).uniform(0.5, 2, (B, T))
  values = np.random.default_rng(12).normal(size=(B, T))
  dirty = np.where(weights > 0, values, np.nan)
  got = float(kd.masked_mean(jnp.asarray(dirty), jnp.asarray(weights)))
  want = (values * weights).sum() / weights.sum() if weights.sum() else 0.0
  assert got == pytest.approx(want, rel=1e-6)


def test_top_k_with_k_equal_to_the_vocabulary_is_the_dense_loss():
  student, teacher, labels = random_case(6)
  weights = np.ones((B, T))
  for tau in (1.0, 2.5):
    dense = ours(student, labels, weights, kd.DenseTeacher(jnp.asarray(teacher)), 0.5, tau)
    top = ours(student, labels, weights, kd.top_k_teacher(jnp.asarray(teacher), V), 0.5, tau)
    assert top[0] == pytest.approx(dense[0], rel=1e-6)
    np.testing.assert_allclose(top[1], dense[1], rtol=1e-5, atol=1e-8)


def test_top_k_is_the_kl_to_the_renormalised_top_k():
  student, teacher, _ = random_case(7)
  k, tau = 3, 2.0
  t = torch.tensor(teacher, dtype=torch.float64) / tau
  top = torch.topk(t, k, -1)
  q = torch.softmax(top.values, -1)  # teacher_tau on its top k, renormalised
  s = torch.log_softmax(torch.tensor(student, dtype=torch.float64) / tau, -1)
  want = (q * (q.log() - torch.gather(s, -1, top.indices))).sum(-1).numpy()
  got = kd.top_k_teacher(jnp.asarray(teacher), k).kl(jnp.asarray(student), tau)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("proposal_temperature", [None, 1.0])
def test_sampled_estimator_is_unbiased(proposal_temperature):
  """Over many independent draws the sampled KL and its gradient average to the dense ones,
  within 5 standard errors, for the target as proposal and for importance weights."""
  student, teacher, _ = random_case(8, vocab=7)
  student, teacher = jnp.asarray(student[:1, :3]), jnp.asarray(teacher[:1, :3])
  tau, draws, per_draw = 2.0, 20000, 4

  def kl_and_grad(teacher_form):
    return jax.value_and_grad(lambda s: jnp.sum(teacher_form.kl(s, tau) * jnp.arange(1, 4)))(
        student)

  exact, exact_grad = kl_and_grad(kd.DenseTeacher(teacher))

  def one(key):
    return kl_and_grad(kd.sample_teacher(key, teacher, per_draw, tau, proposal_temperature))

  values, grads = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(1), draws))
  for sample, want in ((values, exact), (grads, exact_grad)):
    mean, error = sample.mean(0), sample.std(0) / np.sqrt(draws)
    assert np.all(np.abs(mean - want) <= 5 * error + 1e-7), (mean, want, error)
  assert float(error.max()) < 0.01  # the bound is tight enough to catch a real bias


def test_parameter_mistakes_are_one_clear_line():
  student, teacher, labels = random_case(9)
  dense = kd.DenseTeacher(jnp.asarray(teacher))
  for alpha, tau, match in ((1.5, 1.0, "alpha must lie in"), (0.5, 0.0, "temperature must be")):
    with pytest.raises(ValueError, match=match):
      kd.distillation_loss(jnp.asarray(student), jnp.asarray(labels), jnp.ones((B, T)), dense,
                           alpha=alpha, temperature=tau)
  sampled = kd.sample_teacher(jax.random.key(0), jnp.asarray(teacher), 4, 2.0)
  with pytest.raises(ValueError, match="temperature 2.0, not 1.0"):
    sampled.kl(jnp.asarray(student), 1.0)


# ---- vocabularies: a full (or bigger compact) teacher, a compact student ----

@pytest.fixture(scope="module")
def compact():
  encoding = base_encoding()
  words = [" dragon", " the", "Once", " upon", " time", " Lily"]
  extra = [encoding.encode_single_token(w.encode()) for w in words]
  return CompactTokenizer(np.concatenate([byte_base_ids(), named_special_base_ids(), extra]))


def first_byte_oracle(student: CompactTokenizer, size: int) -> np.ndarray:
  """Each o200k id's student id, from tiktoken directly: itself if kept, else its first byte."""
  encoding = base_encoding()
  position = {int(base): i for i, base in enumerate(student.base_ids)}
  byte_id = {b: position[encoding.encode_single_token(bytes([b]))] for b in range(256)}
  out = np.full(size, -1)
  for token in range(encoding.n_vocab):
    out[token] = position.get(token, None) if token in position else byte_id[
        encoding.decode_single_token_bytes(token)[0]]
  return out


def test_vocab_map_sends_missing_ids_to_their_first_byte(compact):
  full = FullTokenizer()
  size = full.vocab_size + 64  # a model padded past its tokenizer
  mapping = kd.vocab_map(full, compact, teacher_vocab_size=size)
  np.testing.assert_array_equal(mapping, first_byte_oracle(compact, size))
  # A compact teacher holding the student's ids and more maps through its own table.
  encoding = base_encoding()
  more = [t for t in encoding.encode_ordinary(" castle princess whispered")
          if t not in set(compact.base_ids.tolist())]
  bigger = CompactTokenizer(np.concatenate([compact.base_ids, more]))
  np.testing.assert_array_equal(kd.vocab_map(bigger, compact),
                                first_byte_oracle(compact, encoding.n_vocab)[bigger.base_ids])


def test_folding_keeps_the_teacher_mass(compact):
  full = FullTokenizer()
  size = full.vocab_size + 64
  mapping = kd.vocab_map(full, compact, teacher_vocab_size=size)
  logits = np.random.default_rng(10).normal(0, 3, (2, size)).astype(np.float32)
  folded = np.exp(np.asarray(kd.fold_to_student(jnp.asarray(logits), mapping,
                                                compact.vocab_size), np.float64))
  kept = mapping >= 0
  p = np.exp(logits[:, kept].astype(np.float64))
  p /= p.sum(-1, keepdims=True)  # the padding rows dropped, the rest renormalised
  want = np.stack([np.bincount(mapping[kept], weights=row, minlength=compact.vocab_size)
                   for row in p])
  # rtol: the space byte's bin sums ~10^5 teacher ids in float32 (~1e-4 off), the rest ~1e-6.
  np.testing.assert_allclose(folded, want, rtol=1e-3, atol=1e-9)
  assert np.median(np.abs(folded - want) / want) < 1e-5
  np.testing.assert_allclose(folded.sum(-1), 1.0, rtol=2e-4)


def test_a_vocabulary_that_cannot_map_is_one_line(compact):
  class Foreign:
    def to_dict(self):
      return {"kind": "full", "encoding": "cl100k_base"}
  with pytest.raises(UserError, match="cannot map.*o200k_harmony"):
    kd.vocab_map(Foreign(), compact)
