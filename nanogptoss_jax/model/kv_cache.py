"""The KV cache of one attention layer: every position on full layers, a ring on sliding ones."""

import flax.struct
import jax
import jax.numpy as jnp

EMPTY_SLOT = -1  # cache position of a slot that holds no key yet


@flax.struct.dataclass
class LayerCache:
  """Keys/values of one layer, with the position each slot holds."""

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
