"""Flash-style attention with learned sinks in O(T) memory (twin: `model.attention.attention`).

The forward pass runs an online softmax over key blocks: a running max, denominator and
weighted sum per query row, with the sink folded in as the starting max and a denominator of 1
(a key with no value). It saves only the output and the log-sum-exp per row; the backward pass
recomputes each block's probabilities from them. Blocks that the causal mask or the sliding
window hides are skipped when the keys are the queries' own tokens in order. Both passes loop
with `lax` control flow, so the compiled program does not grow with the sequence length.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from nanogptoss_jax.kernels.attention import MASKED

QUERY_BLOCK = 128
KEY_BLOCK = 128


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                    k_pos: jax.Array, *, window: int | None, sinks: jax.Array | None,
                    visible: Callable, in_order: bool = False, query_block: int = QUERY_BLOCK,
                    key_block: int = KEY_BLOCK) -> jax.Array:
  """Grouped-query attention: q [B, T, K, G, H], k/v [B, K, S, H] -> [B, T, K, G, H].

  Same contract as `kernels.attention.blocked_attention`: `visible(q_pos, k_pos, window)` is
  the mask rule, `sinks` [K, G] one logit per query head, `in_order` promises keys = queries at
  positions 0..T-1 (so key blocks outside the causal window are skipped).
  """
  kv_heads, groups = q.shape[2], q.shape[3]
  if sinks is None:  # a sink at MASKED takes no mass from any row that sees a key
    sinks = jnp.full((kv_heads, groups), MASKED, jnp.float32)
  blocks = (min(query_block, q.shape[1]), min(key_block, k.shape[2]))
  return _flash(q, k, v, q_pos.astype(jnp.int32), k_pos.astype(jnp.int32),
                sinks.astype(jnp.float32), window, in_order, visible, blocks)


def _pad(x, axis, size, value):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _rows(x, padded_length):
  """[B, T, K, G, H] -> [B, K, T*G (padded), H]."""
  batch, _, kv_heads, groups, head_dim = x.shape
  rows = _pad(x.transpose(0, 2, 1, 3, 4), 2, padded_length, 0)
  return rows.reshape(batch, kv_heads, padded_length * groups, head_dim)


def _layout(q, k, v, q_pos, k_pos, blocks):
  """Rows r = t * G + g per kv head, padded to whole blocks (padding at position -1)."""
  bq, bk = blocks
  nq, nk = -(-q.shape[1] // bq), -(-k.shape[2] // bk)
  return (_rows(q, nq * bq), _pad(k, 2, nk * bk, 0), _pad(v, 2, nk * bk, 0),
          _pad(q_pos, 1, nq * bq, -1), _pad(k_pos, 1, nk * bk, -1), nq, nk)


def _key_range(i, nk, blocks, window, in_order):
  """Key blocks [lo, hi) that query block i can see (all of them unless keys are in order)."""
  bq, bk = blocks
  if not in_order:
    return 0, nk
  hi = jnp.minimum(nk, (i * bq + bq - 1) // bk + 1)
  lo = 0 if window is None else jnp.maximum(0, i * bq - window + 1) // bk
  return lo, hi


def _scores(q_rows, k_blk, row_pos, key_pos, window, visible):
  """Scaled, masked scores [B, K, R, bk] float32."""
  scores = jnp.einsum("bkrh,bksh->bkrs", q_rows, k_blk, preferred_element_type=jnp.float32)
  scores = scores * q_rows.shape[-1] ** -0.5
  return jnp.where(visible(row_pos, key_pos, window)[:, None], scores, MASKED)


def _query_rows(i, rows, q_pos, bq, groups):
  """Query block i: its rows [B, K, R, H] and their positions [B, R]."""
  q_rows = lax.dynamic_slice_in_dim(rows, i * bq * groups, bq * groups, axis=2)
  row_pos = jnp.repeat(lax.dynamic_slice_in_dim(q_pos, i * bq, bq, axis=1), groups, axis=1)
  return q_rows, row_pos


def _forward(q, k, v, q_pos, k_pos, sinks, window, in_order, visible, blocks):
  batch, length, kv_heads, groups, head_dim = q.shape
  bq, bk = blocks
  rows, k, v, q_pos, k_pos, nq, nk = _layout(q, k, v, q_pos, k_pos, blocks)
  sink_rows = jnp.tile(sinks, (1, bq))[None]  # [1, K, R]: row r = t * G + g has sink[k, g]

  def query_block(i):
    q_rows, row_pos = _query_rows(i, rows, q_pos, bq, groups)

    def key_step(j, carry):
      peak, total, acc = carry
      k_blk = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
      v_blk = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      key_pos = lax.dynamic_slice_in_dim(k_pos, j * bk, bk, axis=1)
      scores = _scores(q_rows, k_blk, row_pos, key_pos, window, visible)
      new_peak = jnp.maximum(peak, scores.max(axis=-1))
      shrink = jnp.exp(peak - new_peak)  # rescales what was summed under the old max
      probs = jnp.exp(scores - new_peak[..., None])
      acc = acc * shrink[..., None] + jnp.einsum(
          "bkrs,bksh->bkrh", probs.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
      return new_peak, total * shrink + probs.sum(axis=-1), acc

    shape = (batch, kv_heads, bq * groups)
    start = (jnp.broadcast_to(sink_rows, shape), jnp.ones(shape, jnp.float32),
             jnp.zeros(shape + (head_dim,), jnp.float32))
    lo, hi = _key_range(i, nk, blocks, window, in_order)
    peak, total, acc = lax.fori_loop(lo, hi, key_step, start)
    return acc / total[..., None], peak + jnp.log(total)

  out, lse = lax.map(query_block, jnp.arange(nq))  # [nq, B, K, R, H], [nq, B, K, R]
  out = out.transpose(1, 2, 0, 3, 4).reshape(rows.shape)
  lse = lse.transpose(1, 2, 0, 3).reshape(rows.shape[:-1])
  return out, lse  # float32, [B, K, T*G (padded), H] and [B, K, T*G (padded)]


def _to_queries(rows, length, groups):
  """[B, K, T*G (padded), H] -> [B, T, K, G, H]."""
  batch, kv_heads, _, head_dim = rows.shape
  rows = rows.reshape(batch, kv_heads, -1, groups, head_dim)[:, :, :length]
  return rows.transpose(0, 2, 1, 3, 4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, q_pos, k_pos, sinks, window, in_order, visible, blocks):
  out, _ = _forward(q, k, v, q_pos, k_pos, sinks, window, in_order, visible, blocks)
  return _to_queries(out, q.shape[1], q.shape[3]).astype(v.dtype)


def _flash_forward(q, k, v, q_pos, k_pos, sinks, window, in_order, visible, blocks):
  out, lse = _forward(q, k, v, q_pos, k_pos, sinks, window, in_order, visible, blocks)
  result = _to_queries(out, q.shape[1], q.shape[3]).astype(v.dtype)
  # `out` stays float32 for the backward's row dot: a bfloat16 copy would move dk and dsink
  # further from float32 than autodiff's.
  return result, (q, k, v, q_pos, k_pos, sinks, out, lse)


def _flash_backward(window, in_order, visible, blocks, residuals, dout):
  q, k, v, q_pos, k_pos, sinks, out, lse = residuals
  batch, length, kv_heads, groups, head_dim = q.shape
  bq, bk = blocks
  rows, k_pad, v_pad, q_pos, k_pos, nq, nk = _layout(q, k, v, q_pos, k_pos, blocks)
  dout_rows = _rows(dout, nq * bq)
  # Softmax backward: dscore = p * (dp - sum_s p * dp), and sum_s p * dp = sum_h dout * out.
  row_dot = jnp.sum(dout_rows.astype(jnp.float32) * out, axis=-1)  # [B, K, T*G]
  scale = head_dim ** -0.5
  size = bq * groups

  def query_block(i, grads):
    dq, dk, dv = grads
    q_rows, row_pos = _query_rows(i, rows, q_pos, bq, groups)
    d_rows = lax.dynamic_slice_in_dim(dout_rows, i * size, size, axis=2)
    lse_blk = lax.dynamic_slice_in_dim(lse, i * size, size, axis=2)
    dot_blk = lax.dynamic_slice_in_dim(row_dot, i * size, size, axis=2)

    def key_step(j, carry):
      dq_blk, dk, dv = carry
      k_blk = lax.dynamic_slice_in_dim(k_pad, j * bk, bk, axis=2)
      v_blk = lax.dynamic_slice_in_dim(v_pad, j * bk, bk, axis=2)
      key_pos = lax.dynamic_slice_in_dim(k_pos, j * bk, bk, axis=1)
      probs = jnp.exp(_scores(q_rows, k_blk, row_pos, key_pos, window, visible)
                      - lse_blk[..., None])
      dv_blk = jnp.einsum("bkrs,bkrh->bksh", probs.astype(dout.dtype), d_rows,
                          preferred_element_type=jnp.float32)
      dprobs = jnp.einsum("bkrh,bksh->bkrs", d_rows, v_blk, preferred_element_type=jnp.float32)
      dscores = (probs * (dprobs - dot_blk[..., None]) * scale).astype(q.dtype)
      dq_blk = dq_blk + jnp.einsum("bkrs,bksh->bkrh", dscores, k_blk,
                                   preferred_element_type=jnp.float32)
      dk_blk = jnp.einsum("bkrs,bkrh->bksh", dscores, q_rows, preferred_element_type=jnp.float32)
      dk = lax.dynamic_update_slice_in_dim(
          dk, lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=2) + dk_blk, j * bk, axis=2)
      dv = lax.dynamic_update_slice_in_dim(
          dv, lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=2) + dv_blk, j * bk, axis=2)
      return dq_blk, dk, dv

    lo, hi = _key_range(i, nk, blocks, window, in_order)
    start = (jnp.zeros(q_rows.shape, jnp.float32), dk, dv)
    dq_blk, dk, dv = lax.fori_loop(lo, hi, key_step, start)
    return lax.dynamic_update_slice_in_dim(dq, dq_blk, i * size, axis=2), dk, dv

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dq, dk, dv = lax.fori_loop(0, nq, query_block, (zeros(rows), zeros(k_pad), zeros(v_pad)))
  # The sink is a key with a zero value, so its dp is 0: dsink = -p_sink * row_dot.
  sink_probs = jnp.exp(jnp.tile(sinks, (1, nq * bq))[None] - lse)  # [B, K, T*G]
  dsinks = -(sink_probs * row_dot).reshape(batch, kv_heads, -1, groups).sum(axis=(0, 2))
  dk, dv = dk[:, :, :k.shape[2]], dv[:, :, :v.shape[2]]
  return (_to_queries(dq, length, groups).astype(q.dtype), dk.astype(k.dtype),
          dv.astype(v.dtype), None, None, dsinks)


_flash.defvjp(_flash_forward, _flash_backward)
