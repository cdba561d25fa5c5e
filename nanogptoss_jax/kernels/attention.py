"""Blocked softmax attention with a hand-written backward pass (twin: `model.attention.attention`).

Two speed-ups over the plain math, same values to float32 rounding:
- When a sequence attends to itself in order (training), queries go in blocks of QUERY_BLOCK and
  each block reads only the key blocks it can see: the causal mask and the sliding window hide
  the rest, so their products are never computed.
- The softmax backward uses the identity sum_s p * dp = sum_h dout * out on the saved
  probabilities, where autodiff keeps and re-reads every [.., T, S] intermediate of the forward
  (masking, max, exp, sum, divide).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

# A finite "minus infinity": fully masked rows (padding queries) stay finite instead of NaN,
# and exp(MASKED - max) is exactly 0 in float32 whenever a row has one visible key.
MASKED = -1e30
QUERY_BLOCK = 64


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                      k_pos: jax.Array, *, window: int | None, sinks: jax.Array | None,
                      visible: Callable, in_order: bool = False) -> jax.Array:
  """Grouped-query attention: q [B, T, K, G, H], k/v [B, K, S, H] -> [B, T, K, G, H].

  `visible(q_pos, k_pos, window)` is the mask rule ([B, T, S] bool). `sinks` [K, G] joins each
  softmax as a column with no value. `in_order` promises that keys are the queries' own tokens
  at positions 0..T-1, so whole blocks of keys after a query block can be skipped.
  """
  batch, length, kv_heads, groups, head_dim = q.shape
  if sinks is None:  # a sink at -inf takes no probability mass: plain softmax
    sinks = jnp.full((kv_heads, groups), -jnp.inf)
  sinks = sinks.astype(jnp.float32)
  q = q.transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  blocks = []
  block = QUERY_BLOCK if in_order else length
  for start in range(0, length, block):
    stop = min(start + block, length)
    # Keys from the first one inside the window of this block's first query (rounded down to a
    # block edge, for even matmul shapes) to its last query: the rest are all masked.
    first = 0 if window is None or not in_order else max(0, start - window + 1) // block * block
    last = stop if in_order else k.shape[2]
    # The G queries sharing a kv head become one [G * T] axis: both products are then plain
    # batched matmuls over (B, K), which XLA runs far faster than a 5-d einsum.
    q_block = q[:, :, :, start:stop].reshape(batch, kv_heads, groups * (stop - start), head_dim)
    mask = visible(q_pos[:, start:stop], k_pos[:, first:last], window)[:, None, None]
    out = _softmax_attention(q_block, k[:, :, first:last], v[:, :, first:last], mask, sinks)
    blocks.append(out.reshape(batch, kv_heads, groups, stop - start, head_dim))
  out = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=3)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4)


def _probabilities(q, k, mask, sinks) -> tuple[jax.Array, jax.Array]:
  """(softmax over keys and sink [B, K, G*T, S] float32, the sink's share [B, K, G, T])."""
  batch, kv_heads, rows, head_dim = q.shape
  groups = sinks.shape[-1]
  scores = jnp.einsum("bkqh,bksh->bkqs", q * head_dim ** -0.5, k,
                      preferred_element_type=jnp.float32)
  scores = jnp.where(mask, scores.reshape(batch, kv_heads, groups, rows // groups, -1), MASKED)
  sink = sinks[None, :, :, None]  # [1, K, G, 1]
  peak = jnp.maximum(scores.max(axis=-1), sink)  # [B, K, G, T]; keeps exp() in range
  exps = jnp.exp(scores - peak[..., None])
  sink_exp = jnp.exp(sink - peak)
  total = exps.sum(axis=-1) + sink_exp
  probs = exps / total[..., None]
  return probs.reshape(batch, kv_heads, rows, -1), sink_exp / total


@jax.custom_vjp
def _softmax_attention(q, k, v, mask, sinks):
  """q [B, K, G*T, H], k/v [B, K, S, H], mask [B, 1, 1, T, S], sinks [K, G] -> [B, K, G*T, H]."""
  return _softmax_attention_forward(q, k, v, mask, sinks)[0]


def _softmax_attention_forward(q, k, v, mask, sinks):
  probs, sink_probs = _probabilities(q, k, mask, sinks)
  out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  # The backward pass's row_dot gets `out` unrounded: a bfloat16 copy would move the k and
  # sink gradients further from float32 than autodiff's.
  return out.astype(v.dtype), (q, k, v, out, probs, sink_probs)


def _softmax_attention_backward(residuals, dout):
  q, k, v, out, probs, sink_probs = residuals
  head_dim = q.shape[-1]
  dv = jnp.einsum("bkqs,bkqh->bksh", probs.astype(dout.dtype), dout)
  dprobs = jnp.einsum("bkqh,bksh->bkqs", dout, v, preferred_element_type=jnp.float32)
  # Softmax backward: dscore = p * (dp - sum_s p * dp), and sum_s p * dp = sum_h dout * out.
  row_dot = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)  # [B, K, G*T], out is float32
  dscores = (probs * (dprobs - row_dot[..., None]) * head_dim ** -0.5).astype(q.dtype)
  dq = jnp.einsum("bkqs,bksh->bkqh", dscores, k)
  dk = jnp.einsum("bkqs,bkqh->bksh", dscores, q)
  # The sink is a key with a zero value, so its dp is 0: dsink = -p_sink * row_dot.
  dsinks = -jnp.sum(sink_probs * row_dot.reshape(sink_probs.shape), axis=(0, 3))
  return dq, dk, dv, None, dsinks


_softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)
