"""Knowledge distillation losses: pure functions over a student's logits and a teacher's output.

Per token, loss = (1 - alpha) * CE(label) + alpha * tau^2 * KL(teacher_tau || student_tau), where
x_tau = softmax(logits / tau) and tau^2 keeps the KL's gradient on the scale of the CE's (Hinton
et al.); the mean runs over the tokens a [B, T] weight trains, never over weight-0 ones.

The teacher comes in three forms, each with `.kl(student_logits, temperature) -> [B, T]`:
- `DenseTeacher`: its logits over the student's vocabulary (online distillation).
- `TopKTeacher`: its k most likely ids and their log-probs (an offline cache). Renormalised over
  the k: the stored log-probs are at tau = 1, and only a renormalised top-k can be re-tempered
  for any tau without the full vocabulary's normaliser; the KL is then a true divergence (>= 0,
  0 when the student matches). Renormalising or not, the student is pulled onto the k ids and
  away from the tail: the bias "Sparse Logit Sampling" (Anshumann et al., ACL 2025) measures.
- `SampledTeacher`: ids drawn from a proposal q with their target and proposal log-probs; the
  importance-weighted mean of log p - log s over the draws is an unbiased estimate of the KL and
  of its gradient (that paper's "Random Sampling KD"; q = the target itself gives weight 1).

A bigger teacher vocabulary reaches the student's through `vocab_map` and `fold_to_student`.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nanogptoss_jax.data.tokenizer import Tokenizer
from nanogptoss_jax.errors import UserError


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """p * (log p - log q), 0 where p is 0 (log p = -inf there)."""
  p = jnp.exp(log_p)
  return jnp.where(p > 0, p * (log_p - log_q), 0.0)


def student_log_probs(student_logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseTeacher:
  """The teacher's logits [B, T, V] over the student's vocabulary."""

  logits: jax.Array

  def kl(self, student_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(teacher_tau || student_tau) per token, [B, T]."""
    log_p = jax.nn.log_softmax(self.logits.astype(jnp.float32) / temperature, axis=-1)
    log_q = student_log_probs(student_logits, temperature)
    return jnp.sum(_kl_terms(jax.lax.stop_gradient(log_p), log_q), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TopKTeacher:
  """The teacher's k most likely ids [B, T, K] and their log-probs at tau = 1 [B, T, K]
  (-inf marks an empty slot)."""

  ids: jax.Array
  log_probs: jax.Array

  def kl(self, student_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(top-k teacher_tau renormalised || student_tau) per token, [B, T]."""
    log_p = jax.nn.log_softmax(self.log_probs.astype(jnp.float32) / temperature, axis=-1)
    log_q = jnp.take_along_axis(student_log_probs(student_logits, temperature), self.ids, -1)
    return jnp.sum(_kl_terms(jax.lax.stop_gradient(log_p), log_q), axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SampledTeacher:
  """N ids per token [B, T, N] drawn from a proposal, with the log-probs of the target
  (teacher_tau) and of the proposal there; `temperature` is the tau the target was made for."""

  ids: jax.Array
  log_probs: jax.Array
  proposal_log_probs: jax.Array
  temperature: float = dataclasses.field(metadata=dict(static=True))

  def kl(self, student_logits: jax.Array, temperature: float) -> jax.Array:
    """(1/N) sum_n w_n (log p - log s)(id_n), w = p / q: unbiased for KL(p || s_tau), [B, T]."""
    if temperature != self.temperature:
      raise ValueError(f"these samples target the teacher at temperature {self.temperature}, "
                       f"not {temperature}: draw them again (sample_teacher) for this one")
    log_q = jnp.take_along_axis(student_log_probs(student_logits, temperature), self.ids, -1)
    log_p = jax.lax.stop_gradient(self.log_probs.astype(jnp.float32))
    weight = jnp.exp(log_p - jax.lax.stop_gradient(self.proposal_log_probs))
    return jnp.mean(weight * (log_p - log_q), axis=-1)


def top_k_teacher(teacher_logits: jax.Array, k: int) -> TopKTeacher:
  """What an offline top-k cache stores: the k most likely ids and their log-probs (tau = 1)."""
  every = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  log_probs, ids = jax.lax.top_k(every, k)  # [B, T, K]
  return TopKTeacher(ids=ids, log_probs=log_probs)


def sample_teacher(rng: jax.Array, teacher_logits: jax.Array, num_samples: int,
                   temperature: float, proposal_temperature: float | None = None
                   ) -> SampledTeacher:
  """num_samples ids per token drawn (with replacement) from softmax(logits / proposal
  temperature), by default the target teacher_tau itself, with both log-probs at each id."""
  logits = teacher_logits.astype(jnp.float32)
  target = jax.nn.log_softmax(logits / temperature, axis=-1)  # [B, T, V]
  proposal = (target if proposal_temperature is None
              else jax.nn.log_softmax(logits / proposal_temperature, axis=-1))
  ids = jax.random.categorical(rng, proposal[..., None, :], axis=-1,
                               shape=(*proposal.shape[:-1], num_samples))  # [B, T, N]
  return SampledTeacher(ids=ids, log_probs=jnp.take_along_axis(target, ids, -1),
                        proposal_log_probs=jnp.take_along_axis(proposal, ids, -1),
                        temperature=temperature)


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """-log softmax(logits)[label] per token: logits [B, T, V], labels [B, T] -> [B, T]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w) over [B, T]; a weight-0 token adds nothing (even a NaN), no weight: 0."""
  total = jnp.sum(jnp.where(weights > 0, values * weights, 0.0))
  count = jnp.sum(weights)
  return jnp.where(count > 0, total / jnp.where(count > 0, count, 1.0), 0.0)


def distillation_loss(student_logits: jax.Array, labels: jax.Array, weights: jax.Array,
                      teacher, *, alpha: float, temperature: float) -> tuple[jax.Array, dict]:
  """(weighted mean of (1 - alpha) CE + alpha tau^2 KL, {"ce", "kl", "loss"} means).

  student_logits [B, T, V], labels and weights [B, T]; teacher: one of the *Teacher forms. A
  weight-0 token's logits, label and teacher output are never read, so padding may hold anything.
  """
  if isinstance(alpha, (int, float)) and not 0 <= alpha <= 1:
    raise ValueError(f"distillation alpha must lie in [0, 1] (the teacher's share), got {alpha}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"distillation temperature must be > 0, got {temperature}")
  keep = weights > 0  # [B, T]
  # Masked tokens are replaced by zeros before any arithmetic, so neither their values nor
  # their gradients (0 * NaN = NaN through a softmax) can leak into the mean.
  def blank(x):
    mask = keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim))
    return jnp.where(mask, x, jnp.zeros((), x.dtype))
  student_logits, labels, teacher = blank(student_logits), blank(labels), jax.tree.map(
      blank, teacher)
  ce = token_cross_entropy(student_logits, labels)
  kl = teacher.kl(student_logits, temperature)
  per_token = (1 - alpha) * ce + alpha * temperature ** 2 * kl
  metrics = {"ce": masked_mean(ce, weights), "kl": masked_mean(kl, weights),
             "loss": masked_mean(per_token, weights)}
  return metrics["loss"], metrics


def vocab_map(teacher: Tokenizer, student: Tokenizer, teacher_vocab_size: int | None = None
              ) -> np.ndarray:
  """For each teacher model id, the student model id its probability goes to, int32 [V_teacher].

  Both vocabularies are o200k_harmony ids (a compact one keeps a table of them). An id the
  student lacks goes to the first byte of its spelling: a compact tokenizer writes such a token
  in byte ids, so "the teacher says this token" is, in the student's data, "the next id is its
  first byte", and no teacher mass is dropped or invented. Teacher model rows past its
  tokenizer's vocabulary (padding) map to -1 and are dropped (the rest renormalised).
  """
  try:
    teacher, student = (Tokenizer.from_dict(t.to_dict()) for t in (teacher, student))
  except (ValueError, KeyError, AttributeError) as e:
    raise UserError(f"the teacher's vocabulary cannot map onto the student's: {e}") from None
  size = teacher.vocab_size if teacher_vocab_size is None else teacher_vocab_size
  known = min(size, teacher.vocab_size)
  base_ids = teacher.to_base_ids(np.arange(known))
  spelt = student.from_base_ids(base_ids)  # each base id as its run of student ids
  starts = np.cumsum(student.model_lengths(base_ids)) - student.model_lengths(base_ids)
  out = np.full(size, -1, np.int32)
  out[:known] = spelt[starts]
  return out


def fold_to_student(teacher_logits: jax.Array, mapping: jax.Array, student_vocab_size: int
                    ) -> jax.Array:
  """Teacher logits [..., V_teacher] -> its log-probs [..., V_student] (tau = 1), each id's
  probability added onto `mapping[id]` (vocab_map); usable as logits of a DenseTeacher or for
  top_k_teacher / sample_teacher (tempering then acts on the student's outcomes).

  The sums run in float32: a byte that starts ~10^5 missing ids (the space) is ~1e-4 off.
  """
  mapping = jnp.asarray(mapping)
  kept = mapping >= 0
  log_p = jax.nn.log_softmax(jnp.where(kept, teacher_logits.astype(jnp.float32), -jnp.inf), -1)
  folded = jnp.zeros((*teacher_logits.shape[:-1], student_vocab_size), jnp.float32)
  folded = folded.at[..., jnp.where(kept, mapping, 0)].add(jnp.where(kept, jnp.exp(log_p), 0.0))
  return jnp.log(folded)  # -inf on a student id no teacher id reaches
