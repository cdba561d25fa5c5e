"""The sampler's math: top-k, top-p (nucleus) and a draw, none of which sorts the vocabulary.

Per step the sampler never sorts V (top-k uses lax.top_k, top-p alone a bisection) and draws with
one uniform number per row (see `draw`), so the unembedding dominates a decode step.
"""

import dataclasses

import jax
import jax.numpy as jnp

DRAW_BLOCK = 512  # tokens per block in the two-level draw (about sqrt(201k))
NUCLEUS_CANDIDATES = 256  # top-p alone looks for its nucleus among this many tokens first
KEY_BITS = 32  # bisection steps that pin a float32's sortable key exactly
SIGN_BIT = 1 << 31  # of a float32 seen as a uint32

@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The static (compile-time) part of the sampler; temperature, top_p and stop ids are traced."""

  greedy: bool
  top_k: int | None
  use_top_p: bool


def _sortable_keys(x: jax.Array) -> jax.Array:
  """uint32 keys in the same order as the float32 values x (-inf lowest, +inf highest)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  # Negative floats order backwards as integers: flip all their bits; lift positives above them.
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(SIGN_BIT))


def _nucleus_sorted(values: jax.Array, top_p) -> jax.Array:
  """Descending logits [B, C] with -inf after the smallest prefix holding mass >= top_p."""
  probs = jax.nn.softmax(values, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  # A token joins while the tokens before it hold less than top_p; the first always does.
  # top_p = 1 keeps everything, also the tail after a cumsum that rounded up to 1.
  return jnp.where((mass_before < top_p) | (top_p >= 1), values, -jnp.inf)


def _bisect_boundary(logits: jax.Array, top_p) -> jax.Array:
  """[B, 1] the smallest logit of the top-p nucleus, by bisection over all V logits.

  The nucleus is every token whose logit is >= the largest threshold t with
  mass(logit >= t) >= top_p; 32 halvings over order-preserving uint32 keys pin t exactly.
  """
  probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
  keys = _sortable_keys(logits)
  # Invariant: mass(keys >= low) >= top_p > mass(keys >= high).
  low = keys.min(axis=-1)  # everything: mass 1
  high = keys.max(axis=-1) + 1  # nothing: mass 0 (no overflow: +inf's key is below 2**32 - 1)

  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    mass = jnp.sum(jnp.where(keys >= middle[:, None], probs, 0.0), axis=-1)
    reaches = mass >= top_p
    return jnp.where(reaches, middle, low), jnp.where(reaches, high, middle)

  low, _ = jax.lax.fori_loop(0, KEY_BITS, halve, (low, high))
  return jnp.min(jnp.where(keys >= low[:, None], logits, jnp.inf), axis=-1, keepdims=True)


def _nucleus(logits: jax.Array, top_p) -> jax.Array:
  """Logits [B, V] with -inf outside the top-p nucleus, without sorting V.

  A full sort of a 201k vocabulary costs more than a whole decode step on a CPU. The nucleus
  usually lies within the NUCLEUS_CANDIDATES most likely tokens (one lax.top_k); when it does
  not, a bisection finds it. Either way the cut is a logit value, so tokens tied with the last
  one are all kept (a sort would keep some of them).
  """
  candidates = min(NUCLEUS_CANDIDATES, logits.shape[-1])
  values, _ = jax.lax.top_k(logits, candidates)  # [B, C], descending
  probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))  # of the full V
  count = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1)  # [B], >= 1
  boundary = jnp.take_along_axis(values, count[:, None] - 1, axis=-1)  # [B, 1]
  # count == C means the nucleus may go on past the candidates (unless they are all of V, or
  # top_p = 1 keeps everything anyway: no bisection over V for that common "off" value).
  found = jnp.all(count < candidates) | (candidates == logits.shape[-1]) | (top_p >= 1)
  boundary = jax.lax.cond(found, lambda: boundary, lambda: _bisect_boundary(logits, top_p))
  # top_p = 1 keeps everything, also any tail after a cumulative sum that rounded up to 1.
  return jnp.where((logits >= boundary) | (top_p >= 1), logits, -jnp.inf)


def _candidates(logits: jax.Array, top_k: int | None, top_p) -> tuple[jax.Array, jax.Array | None]:
  """(values [B, C], their token ids [B, C], or None when C = V and values are the logits)."""
  if top_k is not None and top_k < logits.shape[-1]:
    # Exactly k survivors even with ties (a `>= k-th value` threshold would keep every tie).
    values, indices = jax.lax.top_k(logits, top_k)  # [B, k], descending
    return values if top_p is None else _nucleus_sorted(values, top_p), indices
  if top_p is not None:
    return _nucleus(logits, top_p), None
  return logits, None


def filter_logits(logits: jax.Array, top_k: int | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
  """Logits [B, V] with -inf outside the k largest, then outside the top-p nucleus of those.

  The nucleus is the smallest set of most likely tokens (renormalised after top-k) whose mass
  reaches top_p; it always holds at least one token. Ties: top-k keeps exactly k; without
  top_k, tokens tied at the nucleus boundary are all kept.
  """
  values, indices = _candidates(logits, top_k, top_p)
  if indices is None:
    return values
  rows = jnp.arange(logits.shape[0])[:, None]
  return jnp.full_like(logits, -jnp.inf).at[rows, indices].set(values)


def _first_or_last(condition: jax.Array, positive: jax.Array) -> jax.Array:
  """[B] index of the first True in condition [B, N], else of the last True in positive."""
  last = positive.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
  return jnp.where(condition.any(axis=-1), jnp.argmax(condition, axis=-1), last)


def draw(key: jax.Array, logits: jax.Array) -> jax.Array:
  """One index per row drawn with probability softmax(logits [B, C]): [B] int32.

  Inverse-CDF sampling in two levels (the block, then the token inside it): one uniform number
  per row, where jax.random.categorical makes (and sums) one Gumbel number per logit, which
  costs as much as a 201k-vocabulary forward step. Never returns an index whose logit is -inf.
  """
  batch, size = logits.shape
  block = min(DRAW_BLOCK, size)
  blocks = -(-size // block)
  padded = jnp.pad(logits, ((0, 0), (0, blocks * block - size)), constant_values=-jnp.inf)
  peak = jnp.max(padded, axis=-1, keepdims=True)  # [B, 1]
  probs = jnp.exp(padded - peak).reshape(batch, blocks, block)  # [B, G, K], unnormalised
  block_mass = probs.sum(axis=-1)  # [B, G]
  block_end = jnp.cumsum(block_mass, axis=-1)  # [B, G]
  target = jax.random.uniform(key, (batch,)) * block_end[:, -1]  # [B]
  # Rounding can leave the target at or past the last boundary, or make a zero-mass block look
  # like a step: asking for positive mass as well rules both out.
  chosen = _first_or_last((block_end > target[:, None]) & (block_mass > 0), block_mass > 0)
  inside = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [B, K]
  offset = target - (jnp.take_along_axis(block_end, chosen[:, None], axis=1)[:, 0]
                     - jnp.take_along_axis(block_mass, chosen[:, None], axis=1)[:, 0])
  token = _first_or_last((jnp.cumsum(inside, axis=-1) > offset[:, None]) & (inside > 0),
                         inside > 0)
  return (chosen * block + token).astype(jnp.int32)


def sample_tokens(logits: jax.Array, key: jax.Array, settings: SamplerSettings,
                  temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """One token per row of logits [B, V] -> [B] int32."""
  if settings.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Shifted so the largest logit is 0: a tiny temperature then sends the others to -inf (a
  # greedy draw) instead of overflowing to inf, and inf - inf = NaN, in the softmax. The floor
  # keeps a temperature that rounds to 0 in float32 from making the largest 0 / 0.
  scaled = ((logits - jnp.max(logits, axis=-1, keepdims=True))
            / jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny))
  # With top_k only the k candidates are filtered and drawn from, never a V-sized array again.
  values, indices = _candidates(scaled, settings.top_k, top_p if settings.use_top_p else None)
  choice = draw(key, values)  # [B]
  if indices is None:
    return choice
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
