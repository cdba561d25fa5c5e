"""Token streams -> Grain batches of next-token windows (training) and fixed validation windows."""

from collections.abc import Callable

import grain
import numpy as np

from nanogptoss_jax.data.token_cache import TokenStream

# Grain reads a few batches ahead in threads; a small buffer bounds memory for big batches.
READ_THREADS = 2
PREFETCH_BATCHES = 4


def window_count(stream: TokenStream, context_len: int) -> int:
  """How many (context_len + 1)-token windows fit at stride context_len."""
  if context_len < 1:
    raise ValueError(f"context_len must be positive, got {context_len}")
  count = (len(stream.ids) - 1) // context_len
  if count < 1:
    raise ValueError(f"the token stream has {len(stream.ids)} tokens, fewer than one window of "
                     f"context_len + 1 = {context_len + 1}; use more data or a shorter context")
  return count


def make_train_dataset(stream: TokenStream, context_len: int, batch_size: int, seed: int, *,
                       process_index: int = 0, process_count: int = 1,
                       rows: Callable[[np.ndarray], dict] | None = None) -> grain.MapDataset:
  """Endless shuffled batches [batch_size // process_count, context_len + 1] of int32 ids.

  rows: given, each batch is a dict {"inputs", "targets", **rows(window indices)}: per-window
  data (a teacher's cached rows) drawn with its windows, so a resume replays both together."""
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of process_count "
                     f"({process_count})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  local_batch = batch_size // process_count
  local_rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  offsets = np.arange(context_len + 1)
  ids = stream.ids

  def gather_windows(window_indices: np.ndarray) -> np.ndarray:
    # Every process draws the same global batch of window indices and keeps its rows of it.
    starts = window_indices[local_rows].astype(np.int64) * context_len
    windows = ids[starts[:, None] + offsets].astype(np.int32)  # [B, T + 1]
    if rows is None:
      return windows
    return {"inputs": windows[:, :-1], "targets": windows[:, 1:],
            **rows(window_indices[local_rows])}

  # Grain's shuffle reseeds with seed + epoch for indices past the first epoch, so repeat()
  # gives a fresh order every epoch; batches may straddle two epochs.
  return (grain.MapDataset.range(window_count(stream, context_len))
          .shuffle(seed=seed)
          .repeat()
          .batch(batch_size, drop_remainder=True)
          .map(gather_windows))


def make_train_iterator(stream: TokenStream, context_len: int, batch_size: int, seed: int, *,
                        process_index: int = 0, process_count: int = 1,
                        rows: Callable[[np.ndarray], dict] | None = None
                        ) -> grain.DatasetIterator:
  """An iterator over make_train_dataset; get_state() is {'next_index': int} (JSON-able)."""
  dataset = make_train_dataset(stream, context_len, batch_size, seed, rows=rows,
                               process_index=process_index, process_count=process_count)
  read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  return iter(dataset.to_iter_dataset(read_options))


def val_windows(stream: TokenStream, context_len: int, num_windows: int) -> np.ndarray:
  """Up to num_windows fixed int32 windows [n, context_len + 1], evenly spaced over stream."""
  if num_windows < 1:
    raise ValueError(f"num_windows must be positive, got {num_windows}")
  available = window_count(stream, context_len)
  count = min(num_windows, available)
  # Integer spacing of at least one window, so the windows never repeat.
  starts = (np.arange(count) * available // count) * context_len
  return stream.ids[starts[:, None] + np.arange(context_len + 1)].astype(np.int32)  # [n, T + 1]
