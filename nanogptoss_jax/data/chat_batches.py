"""Chat examples -> padded batches: one conversation per row, so none attends to another.

A batch is a dict of numpy arrays [B, T]: `inputs` and `targets` (the next ids) int32,
`weights` float32 (1 on the trained turn's targets, 0 on the prompt and on padding) and
`positions` int32 (0.. per conversation, PADDING_POSITION on padding: attention masks keys at
negative positions, so a padded row computes exactly what the conversation alone does).
"""

import logging

import grain
import numpy as np

from nanogptoss_jax.data.chat import ChatDataError, ChatExample

PADDING_POSITION = -1  # what the model's attention masks as "no key here"
PAD_ID = 0  # any id: padding is never attended to and never weighted
READ_THREADS = 2
PREFETCH_BATCHES = 4


def fit_to_context(examples: list[ChatExample], context_len: int, too_long: str,
                   what: str) -> list[ChatExample]:
  """Examples of at most context_len + 1 ids; longer ones dropped, or cut where some of their
  trained turn still fits ("cut"); either way the count is logged, never silent."""
  if context_len < 1:
    raise ValueError(f"context_len must be positive, got {context_len}")
  kept, dropped, cut = [], 0, 0
  for example in examples:
    if len(example.ids) <= context_len + 1:
      kept.append(example)
    elif too_long == "cut" and example.trained_from <= context_len:
      kept.append(ChatExample(example.ids[:context_len + 1], example.trained_from))
      cut += 1
    else:
      dropped += 1
  if dropped or cut:
    logging.warning("%s: %d of %d conversations are longer than context_len + 1 = %d tokens: "
                    "%d dropped, %d cut to fit", what, dropped + cut, len(examples),
                    context_len + 1, dropped, cut)
  if not kept:
    raise ChatDataError(f"{what}: every conversation is longer than context_len + 1 = "
                        f"{context_len + 1} tokens (or its trained turn starts past it); "
                        "raise the context length")
  return kept


def example_row(example: ChatExample | None, context_len: int) -> dict:
  """One row of a batch (1-D arrays of length context_len); None gives a row of padding."""
  row = {"inputs": np.full(context_len, PAD_ID, np.int32),
         "targets": np.full(context_len, PAD_ID, np.int32),
         "weights": np.zeros(context_len, np.float32),
         "positions": np.full(context_len, PADDING_POSITION, np.int32)}
  if example is not None:
    ids = np.asarray(example.ids, np.int32)
    n = len(ids) - 1
    if n > context_len:
      raise ValueError(f"an example of {len(ids)} ids does not fit context_len {context_len}; "
                       "fit_to_context first")
    row["inputs"][:n], row["targets"][:n] = ids[:-1], ids[1:]
    # Target t is id t + 1: trained when that id belongs to the trained turn.
    row["weights"][:n] = np.arange(1, n + 1) >= example.trained_from
    row["positions"][:n] = np.arange(n)
  return row


def pad_batch(examples: list[ChatExample | None], context_len: int) -> dict:
  """A batch {inputs, targets, weights, positions} of [len(examples), context_len] arrays."""
  rows = [example_row(example, context_len) for example in examples]
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _local_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of process_count "
                     f"({process_count})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def make_chat_train_dataset(examples: list[ChatExample], context_len: int, batch_size: int,
                            seed: int, *, process_index: int = 0,
                            process_count: int = 1) -> grain.MapDataset:
  """Endless shuffled batches of this process's rows (batch_size // process_count of them)."""
  rows = _local_rows(batch_size, process_index, process_count)
  too_long = [i for i, e in enumerate(examples) if len(e.ids) > context_len + 1]
  if too_long or not examples:
    raise ValueError(f"examples must be non-empty and fit context_len + 1 = {context_len + 1} "
                     f"ids (example {too_long[:1]} does not); fit_to_context first")

  def gather(indices: np.ndarray) -> dict:
    # Every process draws the same global batch of indices and keeps its rows of it.
    return pad_batch([examples[i] for i in np.asarray(indices)[rows]], context_len)

  # Grain reseeds the shuffle with seed + epoch, so each epoch has its own order.
  return (grain.MapDataset.range(len(examples)).shuffle(seed=seed).repeat()
          .batch(batch_size, drop_remainder=True).map(gather))


def make_chat_train_iterator(examples: list[ChatExample], context_len: int, batch_size: int,
                             seed: int, *, process_index: int = 0,
                             process_count: int = 1) -> grain.DatasetIterator:
  """An iterator over make_chat_train_dataset; get_state()/set_state() resume it exactly."""
  dataset = make_chat_train_dataset(examples, context_len, batch_size, seed,
                                    process_index=process_index, process_count=process_count)
  read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  return iter(dataset.to_iter_dataset(read_options))


def chat_val_batches(examples: list[ChatExample], context_len: int, batch_size: int, *,
                     process_index: int = 0, process_count: int = 1) -> list[dict]:
  """Every validation example once, in order, as this process's rows of fixed global batches;
  the last batch is topped up with padding rows (weight 0), so every batch has one shape."""
  rows = _local_rows(batch_size, process_index, process_count)
  padded = list(examples) + [None] * (-len(examples) % batch_size)
  return [pad_batch(padded[start:start + batch_size][rows], context_len)
          for start in range(0, len(padded), batch_size)]
