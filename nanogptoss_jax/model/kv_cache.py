"""The KV cache: every position on full layers, a ring on sliding ones; one cache per layer
(the loop layout) or one per layer kind stacked along [L/2] (the scan layout)."""

import flax.struct
import jax
import jax.numpy as jnp

EMPTY_SLOT = -1  # cache position of a slot that holds no key yet


@flax.struct.dataclass
class LayerCache:
  """Keys/values of one layer, with the position each slot holds; in a StackedCache every leaf
  has a leading layer axis [L, ...]."""

  k: jax.Array  # [B, K, S, H]: heads before slots, so attention reads it without a transpose
  v: jax.Array  # [B, K, S, H]
  pos: jax.Array  # [B, S] position stored in each slot, EMPTY_SLOT if none


@flax.struct.dataclass
class StackedCache:
  """Caches of the scan layout (model/layer_stack.py), one stack per kind of layer, carried
  through the scan and written in place: the sliding and the full layer of every pair, [P, ...],
  and the odd last (sliding) layer, [1, ...]."""

  sliding: LayerCache | None
  full: LayerCache | None
  last: LayerCache | None


def empty_cache(batch: int, slots: int, kv_heads: int, head_dim: int, dtype,
                layers: tuple[int, ...] = ()) -> LayerCache:
  """An empty LayerCache; `layers` = (L,) stacks L of them."""
  shape = (*layers, batch, kv_heads, slots, head_dim)
  return LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                    pos=jnp.full((*layers, batch, slots), EMPTY_SLOT, jnp.int32))


def batch_axis(cache) -> int:
  """The axis of the batch (the engine's slots) in every leaf of `cache`."""
  return 1 if isinstance(cache, StackedCache) else 0


def batch_size(cache) -> int:
  return jax.tree.leaves(cache)[0].shape[batch_axis(cache)]


def set_rows(cache, rows, new):
  """`cache` with batch row rows[r] replaced by row r of `new` (out of range: dropped)."""
  if isinstance(cache, StackedCache):
    return jax.tree.map(lambda big, n: big.at[:, rows].set(n, mode="drop"), cache, new)
  return jax.tree.map(lambda big, n: big.at[rows].set(n, mode="drop"), cache, new)


def layer_view(cache: LayerCache, layer: jax.Array | int | None) -> LayerCache:
  """Layer `layer` of a stacked LayerCache (None: `cache` holds one layer)."""
  if layer is None:
    return cache
  return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False), cache)


def cache_write(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array,
                layer: jax.Array | int | None = None) -> LayerCache:
  """Stores k, v [B, K, T, H] at slot `position % S` (a ring when S < max length); with `layer`,
  into that layer of a stacked cache, in place (nothing else of the stack is rewritten).

  Tokens with negative positions (padding) are not stored, nor are tokens that a later token of
  the same write would overwrite (a prefill longer than a sliding ring): scatter order among
  duplicate indices is unspecified, so those are routed out of bounds and dropped.
  """
  slots = cache.pos.shape[-1]
  newest = positions.max(axis=1, keepdims=True)  # [B, 1]
  keep = (positions >= 0) & (positions > newest - slots)
  slot = jnp.where(keep, positions % slots, slots)  # [B, T]; `slots` is out of bounds
  rows = jnp.arange(positions.shape[0])[:, None]
  heads = jnp.arange(k.shape[1])[None, :, None]
  kv_slot = (rows[:, None], heads, slot[:, None, :])  # broadcasts to [B, K, T]
  pos_slot = (rows, slot)
  if layer is not None:
    kv_slot, pos_slot = (layer, *kv_slot), (layer, *pos_slot)
  return LayerCache(
      k=cache.k.at[kv_slot].set(k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[kv_slot].set(v.astype(cache.v.dtype), mode="drop"),
      pos=cache.pos.at[pos_slot].set(positions.astype(jnp.int32), mode="drop"))
