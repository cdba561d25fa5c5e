"""The engine's prefill: every request joining at one chunk boundary shares one batched call.

One call per arrival would make a burst of 16 arrivals wait for 16 calls. A batch of any size
would compile afresh per size (seconds of XLA while serving), so the rows are padded to a power
of two (at most the slot count) and the prompts to `prompt_bucket`: at most log2(slots) + 1
shapes per prompt bucket, each compiled once (`warm_up` compiles them before any request).
Padding rows are all PADDING_POSITION, so they store nothing, and their rows are dropped when
the prefilled rows are written into their slots of the engine's cache.
"""

import jax
import numpy as np
from flax import nnx

from nanogptoss_jax.model import kv_cache
from nanogptoss_jax.sampling.decode import prefill_rows, prompt_bucket


def batch_bucket(rows: int, slots: int) -> int:
  """Padded prefill batch: the next power of two, at most `slots`."""
  return min(slots, 1 << max(rows - 1, 0).bit_length())


def batch_buckets(slots: int) -> list[int]:
  """Every batch size `batch_bucket` returns for 1..slots rows."""
  return sorted({batch_bucket(rows, slots) for rows in range(1, slots + 1)})


def _prefill_into(graphdef, params, cache, tokens, positions, slot_ids, cache_length):
  """Prefills rows [R, T] and writes row r into `cache` row slot_ids[r] (out of range: dropped)."""
  model = nnx.merge(graphdef, params)
  model.eval()
  rows = model.forward(tokens, positions, model.init_cache(tokens.shape[0], cache_length)).cache
  return kv_cache.set_rows(cache, slot_ids, rows)


_prefill_jit = jax.jit(_prefill_into, static_argnums=(0, 6), donate_argnums=2)


def _padded(prompts: list[list[int]], slot_ids: list[int], batch: int, bucket: int, slots: int):
  """(tokens [R, T], positions [R, T], target rows [R]): the prompts' prefill rows, then
  padding rows aimed past the last slot."""
  rows = np.full(batch, slots, np.int32)
  rows[:len(slot_ids)] = slot_ids
  return (*prefill_rows(prompts, batch, bucket), rows)


def prefill(graphdef, params, cache, prompts: list[list[int]], slot_ids: list[int],
            cache_length: int):
  """`cache` with each prompt but its last token prefilled into its slot's row.

  The last token is fed by the slot's first decode step, as in sampling/decode.py's generate.
  """
  slots = kv_cache.batch_size(cache)
  batch = batch_bucket(len(prompts), slots)
  bucket = prompt_bucket(max(max(len(p) for p in prompts) - 1, 1))
  return _prefill_jit(graphdef, params, cache, *_padded(prompts, slot_ids, batch, bucket, slots),
                      cache_length)


def warm_up(graphdef, params, cache, prompt_length: int, cache_length: int):
  """Compiles every batch bucket for `prompt_length`'s prompt bucket; returns `cache` unchanged.

  All rows are padding aimed past the last slot, so nothing is stored or written.
  """
  slots = kv_cache.batch_size(cache)
  bucket = prompt_bucket(max(prompt_length - 1, 1))
  # The first call may see a fresh cache whose sharding (single device) differs from the
  # jitted outputs' (the model's mesh): a key of its own, so batch 1 is compiled again after it.
  for batch in [1, *batch_buckets(slots)]:
    cache = _prefill_jit(graphdef, params, cache, *_padded([], [], batch, bucket, slots),
                         cache_length)
  return cache
