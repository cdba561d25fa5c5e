"""Causal attention with optional sinks and sliding window, over an optional KV cache.

Everything is driven by explicit token positions: a key is visible to a query when its position
is known (>= 0), not after the query's, and (on sliding layers) fewer than `window` positions
before it. The same rule serves training (keys = the sequence itself), prefill and decode
(keys = the cache), and batches whose rows sit at different positions.
"""

import flax.struct
import jax
import jax.numpy as jnp

from nanogptoss_jax.config import GptOssConfig
from nanogptoss_jax.layers import RMSNorm, dtype_of, linear, normal_init, residual_init
from nanogptoss_jax.rope import apply_rope
from flax import nnx

# A finite "minus infinity": fully masked rows (padding queries) stay finite instead of NaN,
# and exp(MASKED - max) is exactly 0 in float32 whenever a row has one visible key.
MASKED = -1e30
EMPTY_SLOT = -1  # cache position of a slot that holds no key yet
# Query block size when a sequence attends to itself in order (training): key blocks wholly
# after a query block, or wholly before its window, are skipped. On a 2-core CPU, nano's
# attention forward + backward (T = 256) takes 18 ms a layer in blocks of 64 against 27 whole.
QUERY_BLOCK = 64


@flax.struct.dataclass
class LayerCache:
  """Keys/values of one layer. Full layers hold every position; sliding layers a ring."""

  k: jax.Array  # [B, K, S, H]: heads before slots, so attention reads it without a transpose
  v: jax.Array  # [B, K, S, H]
  pos: jax.Array  # [B, S] position stored in each slot, EMPTY_SLOT if none


def empty_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype) -> LayerCache:
  shape = (batch, kv_heads, slots, head_dim)
  return LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    pos=jnp.full((batch, slots), EMPTY_SLOT, jnp.int32))


def cache_write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerCache:
  """Stores k, v [B, K, T, H] at slot `position % S` (a ring when S < max length).

  Tokens with negative positions (padding) are not stored, nor are tokens that a later token of
  the same write would overwrite (a prefill longer than a sliding ring): scatter order among
  duplicate indices is unspecified, so those are routed out of bounds and dropped.
  """
  slots = cache.pos.shape[1]
  newest = positions.max(axis=1, keepdims=True)  # [B, 1]
  keep = (positions >= 0) & (positions > newest - slots)
  slot = jnp.where(keep, positions % slots, slots)  # [B, T]; `slots` is out of bounds
  rows = jnp.arange(positions.shape[0])[:, None]
  heads = jnp.arange(k.shape[1])[None, :, None]
  kv_slot = (rows[:, None], heads, slot[:, None, :])  # broadcasts to [B, K, T]
  return LayerCache(
      k=cache.k.at[kv_slot].set(k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[kv_slot].set(v.astype(cache.v.dtype), mode="drop"),
      pos=cache.pos.at[rows, slot].set(positions.astype(jnp.int32), mode="drop"))


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
  """[B, T, S] bool: key s is visible to query t (causal, known, within the window)."""
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  ok = (k >= 0) & (k <= q)
  if window is not None:
    ok &= q - k < window  # `window` keys, the query's own position included
  return ok


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
           window: int | None, sinks: jax.Array | None, in_order: bool = False) -> jax.Array:
  """Grouped-query attention: q [B, T, K, G, H], k/v [B, K, S, H] -> [B, T, K, G, H].

  `sinks` [K, G] is one learned logit per query head that joins the softmax as an extra column
  with no value: it soaks up probability mass (so a head may attend to nothing) and is dropped.
  `in_order` promises that keys are the queries' own tokens at positions 0..T-1, so that a key
  after a query (by index) is never visible to it: whole blocks of keys can then be skipped.
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


# Softmax attention with a hand-written backward pass. It saves the probabilities and uses the
# softmax identity sum_s p * dp = sum_h dout * out, where autodiff of the forward above keeps
# and re-reads every [.., T, S] intermediate (masking, max, exp, sum, divide): 4-5% off a nano
# train step on a 2-core CPU, same gradients to float32 rounding.
@jax.custom_vjp
def _softmax_attention(q, k, v, mask, sinks):
  """q [B, K, G*T, H], k/v [B, K, S, H], mask [B, 1, 1, T, S], sinks [K, G] -> [B, K, G*T, H]."""
  return _softmax_attention_forward(q, k, v, mask, sinks)[0]


def _softmax_attention_forward(q, k, v, mask, sinks):
  probs, sink_probs = _probabilities(q, k, mask, sinks)
  out = jnp.einsum("bkqs,bksh->bkqh", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  # The backward pass's row_dot gets `out` unrounded: with the bfloat16 copy, one draw's k and
  # sink gradients were 2.1x and 2.8x further from float32 than autodiff's (1.5x unrounded).
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


def attend_with_cache(q, k, v, positions, cache: LayerCache | None, *, window: int | None,
                      sinks: jax.Array | None, in_order: bool = False
                      ) -> tuple[jax.Array, LayerCache | None]:
  """Attention of new tokens over themselves (no cache) or over cache + themselves.

  q [B, T, K, G, H]; k, v [B, T, K, H] for the new tokens. `in_order`: positions are 0..T-1.
  """
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  if cache is None:
    return attend(q, k, v, positions, positions, window=window, sinks=sinks,
                  in_order=in_order), None
  if window is None:
    # Full layer: the cache has a slot for every position, so write first and read it whole.
    cache = cache_write(cache, k, v, positions)
    out = attend(q, cache.k, cache.v, positions, cache.pos, window=None, sinks=sinks)
    return out, cache
  # Sliding layer: the ring holds only the last `window` positions, and a multi-token write
  # would evict keys that this chunk's earlier queries still need; read ring + chunk, then write.
  keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=2)  # [B, K, S + T, H]
  values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=2)
  key_pos = jnp.concatenate([cache.pos, positions.astype(jnp.int32)], axis=1)
  out = attend(q, keys, values, positions, key_pos, window=window, sinks=sinks)
  return out, cache_write(cache, k, v, positions)


class Attention(nnx.Module):
  """GPT-OSS attention block: RMSNorm, fused qkv, RoPE/YaRN, sinks, GQA, output projection."""

  def __init__(self, cfg: GptOssConfig, layer: int, *, rngs: nnx.Rngs):
    self.num_heads = cfg.num_attention_heads
    self.kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    self.window = cfg.layer_window(layer)
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.norm = RMSNorm(cfg.hidden_size, param_dtype=cfg.param_dtype, rngs=rngs)
    qkv_size = cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    self.qkv = linear(cfg.hidden_size, qkv_size, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=normal_init(), rngs=rngs)
    # Sinks start at 0: one extra "key" scoring like an average key, which the model can raise
    # (heads that should rest) or push towards -inf (plain softmax).
    self.sinks = nnx.Param(jnp.zeros((cfg.num_attention_heads,), param_dtype))
    self.out = linear(cfg.head_dim * cfg.num_attention_heads, cfg.hidden_size, dtype=dtype,
                      param_dtype=param_dtype,
                      kernel_init=residual_init(cfg.num_hidden_layers), rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
               cache: LayerCache | None = None, *, in_order: bool = False
               ) -> tuple[jax.Array, LayerCache | None]:
    batch, length, _ = x.shape
    groups = self.num_heads // self.kv_heads
    qkv = self.qkv(self.norm(x))
    q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
    # Query head n = k * G + g shares kv head k, as in the reference's view(T, K, G, H).
    q = qkv[..., :q_size].reshape(batch, length, self.kv_heads, groups, self.head_dim)  # [B, T, K, G, H]
    k = qkv[..., q_size:q_size + kv_size].reshape(batch, length, self.kv_heads, self.head_dim)  # [B, T, K, H]
    v = qkv[..., q_size + kv_size:].reshape(batch, length, self.kv_heads, self.head_dim)  # [B, T, K, H]
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    sinks = self.sinks[...].reshape(self.kv_heads, groups)  # [K, G]
    out, cache = attend_with_cache(q, k, v, positions, cache, window=self.window, sinks=sinks,
                                   in_order=in_order)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)  # [B, T, N * H]
    return self.out(out), cache
