"""What a run reads: pretraining windows or harmony conversations, as training batches (an
iterator whose position a checkpoint saves) and the fixed batches evaluation reads.

Text gives token windows [b, T + 1] and evaluates every next token (and bits per byte); chat
data gives padded batch dicts {inputs, targets, weights, positions} [b, T] (data/chat_batches.py)
and evaluates the assistant-token loss: the weighted mean over the held-out conversations'
trained tokens, the tokens the model samples in its answer.
"""

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from nanogptoss_jax.chat.examples import conversation_examples, prepare_chat_examples
from nanogptoss_jax.data.chat import read_conversations
from nanogptoss_jax.data.chat_batches import chat_val_batches, make_chat_train_iterator
from nanogptoss_jax.data.streams import prepare_data
from nanogptoss_jax.data.tokenizer import (FullTokenizer, Tokenizer, count_base_ids,
                                           tokenizer_from_config)
from nanogptoss_jax.data.windows import make_train_iterator, val_windows
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.training import mesh as sharding
from nanogptoss_jax.training.run_config import RunConfig


@dataclasses.dataclass
class RunData:
  """A run's data, this process's share of it."""

  tokenizer: Tokenizer
  iterator: Any  # next() -> this process's rows of a batch; get_state() / set_state()
  val_batches: list  # this process's rows of each evaluation batch (arrays or dicts)
  # Bytes of text per token for bits per byte; None for chats (their loss is per trained token).
  bytes_per_token: float | None
  train_stream: Any = None  # text runs: the training tokens (an offline teacher's cache key)

  def next_batch(self, grad_accum: int, batch_sharding) -> Any:
    """The next training batch, split into micro-batches [accum, B / accum, ...] and placed."""
    local = next(self.iterator)
    local = local.astype(np.int32) if isinstance(local, np.ndarray) else local
    return jax.tree.map(
        lambda rows: sharding.global_batch(rows.reshape(grad_accum, -1, *rows.shape[1:]),
                                           batch_sharding), local)


def open_run_data(cfg: RunConfig, tokenizer: Tokenizer | None) -> RunData:
  """The run's data in `tokenizer`'s ids (a resumed run's or init_from's), else in the vocabulary
  its config asks for, built now."""
  if cfg.data.is_chat:
    return _chat_data(cfg, tokenizer)
  return _text_data(cfg, tokenizer)


def _micro_batch(cfg: RunConfig) -> int:
  return cfg.train.batch_size // cfg.train.grad_accum


def _text_data(cfg: RunConfig, tokenizer: Tokenizer | None) -> RunData:
  tokenizer, train_stream, val_stream = prepare_data(cfg.data, tokenizer)
  train, micro_batch = cfg.train, _micro_batch(cfg)
  windows = val_windows(val_stream, train.context_len, cfg.data.val_windows)
  if len(windows) < micro_batch:
    raise ConfigError(
        f"evaluation needs at least one batch of {micro_batch} validation windows of "
        f"train.context_len={train.context_len} tokens, but there are only "
        f"{len(windows)} (data.val_windows={cfg.data.val_windows}, capped by the "
        f"validation split's size); raise --config.data.val_windows or lower "
        f"--config.train.batch_size")
  # Whole batches only, so one shape compiles; each process reads its rows of each batch.
  per_process = micro_batch // jax.process_count()
  mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  batches = [windows[start:start + micro_batch][mine].astype(np.int32)
             for start in range(0, len(windows) // micro_batch * micro_batch, micro_batch)]
  iterator = make_train_iterator(train_stream, train.context_len, train.batch_size, train.seed,
                                 process_index=jax.process_index(),
                                 process_count=jax.process_count())
  return RunData(tokenizer, iterator, batches, val_stream.bytes_per_token, train_stream)


def chat_tokenizer(cfg: RunConfig) -> Tokenizer:
  """A chat run's vocabulary when nothing gives one: o200k_harmony, or a compact one built from
  the training conversations' ids (it keeps harmony's special tokens whatever the counts)."""
  full = FullTokenizer()
  if not cfg.data.compact_vocab_size:
    return full
  chat = cfg.data.chat
  counts = sum(count_base_ids(example.ids) for conversation in read_conversations(
      chat, chat.train_split) for example in conversation_examples(conversation, full, chat))
  return tokenizer_from_config(cfg.data.compact_vocab_size, counts)


def _chat_data(cfg: RunConfig, tokenizer: Tokenizer | None) -> RunData:
  tokenizer = tokenizer or chat_tokenizer(cfg)
  train, chat = cfg.train, cfg.data.chat
  train_examples, val_examples = prepare_chat_examples(chat, tokenizer, train.context_len)
  logging.info("chat data %s: %d training and %d held-out examples", chat.path,
               len(train_examples), len(val_examples))
  place = dict(process_index=jax.process_index(), process_count=jax.process_count())
  iterator = make_chat_train_iterator(train_examples, train.context_len, train.batch_size,
                                      train.seed, **place)
  batches = chat_val_batches(val_examples, train.context_len, _micro_batch(cfg), **place)
  return RunData(tokenizer, iterator, batches, None)
