"""Attention with learned sinks as Triton-style Pallas kernels (twin: `model.attention.attention`).

The math of `kernels.flash_attention`: an online softmax over key blocks with the sink as the
starting max and a denominator of 1; the forward kernel saves the output and the log-sum-exp
per row, and two backward kernels recompute probabilities from them (one per key block for dk
and dv, one per row block for dq), so no kernel writes to memory another program also writes.
Rows r = t * G + g of a kv head are blocked as one matrix, so G need not be a power of two.
A `pallas_call` cannot be differentiated in interpret mode (how the tests run it on the CPU),
so the gradient is a custom VJP whose backward is kernels too; the row dot and the sink
gradient are elementwise and stay in plain JAX.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from nanogptoss_jax.kernels.attention import MASKED

ROW_BLOCK = 64
KEY_BLOCK = 64
# Triton's dot wants every side >= 16; zero head columns change no score and no output.
MIN_HEAD_DIM = 16
# Renamed across JAX versions: squeezed block dims were `None` and became `pl.squeezed`.
SQUEEZED = getattr(pl, "squeezed", None)


def pallas_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                     k_pos: jax.Array, *, window: int | None, sinks: jax.Array | None,
                     visible: Callable, in_order: bool = False, row_block: int = ROW_BLOCK,
                     key_block: int = KEY_BLOCK, interpret: bool | None = None) -> jax.Array:
  """Grouped-query attention: q [B, T, K, G, H], k/v [B, K, S, H] -> [B, T, K, G, H].

  Same contract as `kernels.flash_attention.flash_attention`. `interpret` defaults to True off
  the GPU (Pallas' interpreter: slow, for tests). Blocks must be powers of two (Triton).
  """
  batch, length, kv_heads, groups, head_dim = q.shape
  keys = k.shape[2]
  if sinks is None:  # a sink at MASKED takes no mass from any row that sees a key
    sinks = jnp.full((kv_heads, groups), MASKED, jnp.float32)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  padded_dim = max(MIN_HEAD_DIM, 1 << (head_dim - 1).bit_length())
  num_rows = -(-length * groups // row_block) * row_block
  num_keys = -(-keys // key_block) * key_block

  def pad(x, axis, size, value=0):
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)

  rows = q.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, length * groups, head_dim)
  rows = pad(pad(rows, 2, num_rows), 3, padded_dim)  # [B, K, R, Hp]
  k, v = (pad(pad(x, 2, num_keys), 3, padded_dim) for x in (k, v))  # [B, K, S (padded), Hp]
  row_pos = pad(jnp.repeat(q_pos.astype(jnp.int32), groups, axis=1), 1, num_rows, -1)  # [B, R]
  k_pos = pad(k_pos.astype(jnp.int32), 1, num_keys, -1)
  sink_rows = pad(jnp.tile(sinks.astype(jnp.float32), (1, length)), 1, num_rows, MASKED)  # [K, R]
  static = _Static(window, in_order, visible, row_block, key_block, groups, -(-keys // key_block),
                   head_dim ** -0.5, interpret)
  out = _attention(rows, k, v, row_pos, k_pos, sink_rows, static)  # [B, K, R, Hp] float32
  out = out[:, :, :length * groups, :head_dim].reshape(batch, kv_heads, length, groups, head_dim)
  return out.transpose(0, 2, 1, 3, 4).astype(v.dtype)


class _Static(tuple):
  """Hashable static settings of one call (a custom VJP's nondiff argument)."""
  names = ("window", "in_order", "visible", "row_block", "key_block", "groups", "key_blocks",
           "scale", "interpret")

  def __new__(cls, *values):
    return super().__new__(cls, values)

  def __getattr__(self, name):
    return self[self.names.index(name)]


def _dot(a, b, contract=(1, 0)):
  """a @ b over axes `contract` with float32 accumulation (full precision for float32)."""
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _masked_scores(q, k, row_pos, key_pos, st):
  """Scaled scores [rows, keys] float32, MASKED where `visible` hides the key."""
  scores = _dot(q, k, (1, 1)) * st.scale
  return jnp.where(st.visible(row_pos[None], key_pos[None], st.window)[0], scores, MASKED)


def _key_range(i, st):
  """Key blocks [lo, hi) that row block i can see (all unless keys are the queries in order)."""
  if not st.in_order:
    return 0, st.key_blocks
  first, last = (i * st.row_block) // st.groups, (i * st.row_block + st.row_block - 1) // st.groups
  hi = jnp.minimum(st.key_blocks, last // st.key_block + 1)
  lo = 0 if st.window is None else jnp.maximum(0, first - st.window + 1) // st.key_block
  return lo, hi


def _row_range(j, row_blocks, st):
  """Row blocks [lo, hi) that can see key block j (all unless keys are the queries in order)."""
  if not st.in_order:
    return 0, row_blocks
  lo = (j * st.key_block * st.groups) // st.row_block
  if st.window is None:
    return lo, row_blocks
  last_query = j * st.key_block + st.key_block - 1 + st.window - 1
  return lo, jnp.minimum(row_blocks, (last_query * st.groups + st.groups - 1) // st.row_block + 1)


def _forward_kernel(q_ref, k_ref, v_ref, row_pos_ref, key_pos_ref, sink_ref, out_ref, lse_ref,
                    *, st):
  q, row_pos, bk = q_ref[...], row_pos_ref[...], st.key_block

  def key_step(j, carry):
    peak, total, acc = carry
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    scores = _masked_scores(q, k_ref[keys, :], row_pos, key_pos_ref[keys], st)
    new_peak = jnp.maximum(peak, scores.max(axis=-1))
    shrink = jnp.exp(peak - new_peak)  # rescales what was summed under the old max
    probs = jnp.exp(scores - new_peak[:, None])
    acc = acc * shrink[:, None] + _dot(probs.astype(v_ref.dtype), v_ref[keys, :])
    return new_peak, total * shrink + probs.sum(axis=-1), acc

  start = (sink_ref[...], jnp.ones(row_pos.shape, jnp.float32),
           jnp.zeros(q.shape, jnp.float32))
  lo, hi = _key_range(pl.program_id(2), st)
  peak, total, acc = lax.fori_loop(lo, hi, key_step, start)
  out_ref[...] = acc / total[:, None]
  lse_ref[...] = peak + jnp.log(total)


def _dkdv_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, dot_ref, row_pos_ref, key_pos_ref,
                 dk_ref, dv_ref, *, st):
  k, v, key_pos, br = k_ref[...], v_ref[...], key_pos_ref[...], st.row_block

  def row_step(i, carry):
    dk, dv = carry
    rows = pl.ds(pl.multiple_of(i * br, br), br)
    q, dout = q_ref[rows, :], dout_ref[rows, :]
    probs = jnp.exp(_masked_scores(q, k, row_pos_ref[rows], key_pos, st)
                    - lse_ref[rows][:, None])
    dv = dv + _dot(probs.astype(dout.dtype), dout, (0, 0))
    # Softmax backward: dscore = p * (dp - sum_s p * dp), and sum_s p * dp = sum_h dout * out.
    dscores = probs * (_dot(dout, v, (1, 1)) - dot_ref[rows][:, None]) * st.scale
    return dk + _dot(dscores.astype(q.dtype), q, (0, 0)), dv

  lo, hi = _row_range(pl.program_id(2), q_ref.shape[0] // br, st)
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(lo, hi, row_step, (zeros, zeros))
  dk_ref[...], dv_ref[...] = dk.astype(dk_ref.dtype), dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, dout_ref, lse_ref, dot_ref, row_pos_ref, key_pos_ref,
               dq_ref, *, st):
  q, dout, row_pos, bk = q_ref[...], dout_ref[...], row_pos_ref[...], st.key_block
  lse, row_dot = lse_ref[...], dot_ref[...]

  def key_step(j, dq):
    keys = pl.ds(pl.multiple_of(j * bk, bk), bk)
    k = k_ref[keys, :]
    probs = jnp.exp(_masked_scores(q, k, row_pos, key_pos_ref[keys], st) - lse[:, None])
    dscores = probs * (_dot(dout, v_ref[keys, :], (1, 1)) - row_dot[:, None]) * st.scale
    return dq + _dot(dscores.astype(k.dtype), k)

  lo, hi = _key_range(pl.program_id(2), st)
  dq = lax.fori_loop(lo, hi, key_step, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _call(kernel, st, grid, in_specs, out_specs, out_shape):
  options = {}
  if not st.interpret:  # Triton's settings; the class was renamed across JAX versions
    from jax.experimental.pallas import triton as plgpu
    params = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
    options["compiler_params"] = params(num_warps=4, num_stages=2)
  return pl.pallas_call(functools.partial(kernel, st=st), grid=grid, in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape, interpret=st.interpret,
                        **options)


def _specs(rows, keys, head_dim):
  """BlockSpecs over (b, kv head, block): row-major [.., rows|keys, Hp] and per-row vectors."""
  def matrix(size, blocked):
    return pl.BlockSpec((SQUEEZED, SQUEEZED, size, head_dim),
                        (lambda b, h, i: (b, h, i, 0)) if blocked else
                        (lambda b, h, i: (b, h, 0, 0)))

  def vector(size, blocked, rank=3):
    if rank == 2:
      return pl.BlockSpec((SQUEEZED, size), (lambda b, h, i: (b, i)) if blocked else
                          (lambda b, h, i: (b, 0)))
    return pl.BlockSpec((SQUEEZED, SQUEEZED, size), (lambda b, h, i: (b, h, i)) if blocked else
                        (lambda b, h, i: (b, h, 0)))
  return matrix, vector


def _forward(rows, k, v, row_pos, k_pos, sink_rows, st):
  batch, kv_heads, num_rows, head_dim = rows.shape
  br, num_keys = st.row_block, k.shape[2]
  matrix, vector = _specs(br, num_keys, head_dim)
  sink_spec = pl.BlockSpec((SQUEEZED, br), lambda b, h, i: (h, i))
  return _call(_forward_kernel, st, (batch, kv_heads, num_rows // br),
               [matrix(br, True), matrix(num_keys, False), matrix(num_keys, False),
                vector(br, True, 2), vector(num_keys, False, 2), sink_spec],
               [matrix(br, True), vector(br, True)],
               [jax.ShapeDtypeStruct(rows.shape, jnp.float32),
                jax.ShapeDtypeStruct(rows.shape[:3], jnp.float32)]
               )(rows, k, v, row_pos, k_pos, sink_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(rows, k, v, row_pos, k_pos, sink_rows, st):
  return _forward(rows, k, v, row_pos, k_pos, sink_rows, st)[0]


def _attention_forward(rows, k, v, row_pos, k_pos, sink_rows, st):
  out, lse = _forward(rows, k, v, row_pos, k_pos, sink_rows, st)
  return out, (rows, k, v, row_pos, k_pos, sink_rows, out, lse)


def _attention_backward(st, residuals, dout):
  rows, k, v, row_pos, k_pos, sink_rows, out, lse = residuals
  batch, kv_heads, num_rows, head_dim = rows.shape
  br, bk, num_keys = st.row_block, st.key_block, k.shape[2]
  dout = dout.astype(rows.dtype)
  row_dot = jnp.sum(dout.astype(jnp.float32) * out, axis=-1)  # [B, K, R]
  matrix, vector = _specs(br, bk, head_dim)
  args = (rows, k, v, dout, lse, row_dot, row_pos, k_pos)
  dk, dv = _call(_dkdv_kernel, st, (batch, kv_heads, num_keys // bk),
                 [matrix(num_rows, False), matrix(bk, True), matrix(bk, True),
                  matrix(num_rows, False), vector(num_rows, False), vector(num_rows, False),
                  vector(num_rows, False, 2), vector(bk, True, 2)],
                 [matrix(bk, True), matrix(bk, True)],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct(v.shape, v.dtype)])(*args)
  dq = _call(_dq_kernel, st, (batch, kv_heads, num_rows // br),
             [matrix(br, True), matrix(num_keys, False), matrix(num_keys, False),
              matrix(br, True), vector(br, True), vector(br, True), vector(br, True, 2),
              vector(num_keys, False, 2)],
             matrix(br, True), jax.ShapeDtypeStruct(rows.shape, rows.dtype))(*args)
  # The sink is a key with a zero value, so its dp is 0: dsink = -p_sink * row_dot.
  dsink_rows = -(jnp.exp(sink_rows[None] - lse) * row_dot).sum(axis=0)  # [K, R]
  return dq, dk, dv, None, None, dsink_rows


_attention.defvjp(_attention_forward, _attention_backward)
