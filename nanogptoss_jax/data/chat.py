"""Chat data: conversations from JSON Lines files or `datasets` (a hub id or a local directory),
each a `messages` list in OpenAI's form, and the example each becomes once rendered in harmony
(chat/examples.py renders; data/chat_batches.py batches)."""

import dataclasses
import json
import os
import re

import numpy as np

from nanogptoss_jax.data.config import (TOO_LONG, TRAIN_TURNS, ChatDataConfig,  # noqa: F401
                                        ChatDataError, DataUnavailableError)
from nanogptoss_jax.data.sources import Source, _load_hf_split

JSONL_SUFFIXES = (".jsonl", ".json")
# Per-row keys besides the messages and tools columns that a conversation may carry.
ROW_REASONING_EFFORT = "reasoning_effort"


@dataclasses.dataclass(frozen=True)
class ChatExample:
  """One conversation as model ids; ids[trained_from:] are the tokens its trained turn samples."""

  ids: np.ndarray  # [n] int32
  trained_from: int


def _jsonl_rows(path: str) -> list:
  rows = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as error:
        raise ChatDataError(f"{path} line {number} is not JSON ({error.msg}, column "
                            f"{error.colno}); write one conversation object per line") from None
  return rows


def _split_file(directory: str, split: str) -> str | None:
  for suffix in JSONL_SUFFIXES:
    candidate = os.path.join(directory, split + suffix)
    if os.path.isfile(candidate):
      return candidate
  return None


def _raw_rows(cfg: ChatDataConfig, split: str) -> tuple[list, str]:
  """The split's rows as read, and a name for messages about them."""
  path = cfg.path
  if not path:
    raise DataUnavailableError("chat data needs a path: a .jsonl file, a directory of "
                               "<split>.jsonl files, a datasets directory or a hub dataset id")
  if os.path.isfile(path):
    if split != cfg.train_split:
      raise DataUnavailableError(
          f"{path} is one file, so it is the training split only; set the chat data's "
          f"val_split='' to hold out {cfg.val_conversations} of its conversations, or point path "
          f"at a directory holding {cfg.train_split}.jsonl and {split}.jsonl")
    return _jsonl_rows(path), path
  if os.path.isdir(path) and any(n.endswith(JSONL_SUFFIXES) for n in os.listdir(path)):
    found = _split_file(path, split)
    if found is None:
      names = sorted(n for n in os.listdir(path) if n.endswith(JSONL_SUFFIXES))
      raise DataUnavailableError(f"split {split!r}: no {split}.jsonl in {path} (it holds "
                                 f"{names}); name the split's file so, or set val_split=''")
    return _jsonl_rows(found), found
  if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is None:
    raise DataUnavailableError(f"chat data path {path} does not exist and is not a Hugging Face "
                               "dataset id (owner/name)")
  kind = "local" if os.path.isdir(path) else "hub"
  source = Source(kind, path, {}, os.path.basename(path.rstrip("/")))
  dataset = _load_hf_split(source, split, cfg.messages_column)
  return dataset.to_list(), f"{path} split {split}"


def _conversation(row, cfg: ChatDataConfig, where: str) -> dict:
  """{"messages", "tools", "reasoning_effort"} of one row, its shape checked."""
  messages = row.get(cfg.messages_column) if isinstance(row, dict) else None
  if not isinstance(messages, list) or not messages:
    raise ChatDataError(f"{where}: expected an object with a non-empty {cfg.messages_column!r} "
                        f"list of messages, got {str(row)[:200]!r}")
  tools = row.get(cfg.tools_column)
  if tools is not None and not isinstance(tools, list):
    raise ChatDataError(f"{where}: {cfg.tools_column!r} must be a list of function specs")
  effort = row.get(ROW_REASONING_EFFORT) or cfg.reasoning_effort
  return {"messages": messages, "tools": tools or None, "reasoning_effort": effort,
          "where": where}


def read_conversations(cfg: ChatDataConfig, split: str) -> list[dict]:
  """The split's conversations ({"messages", "tools", "reasoning_effort", "where"}), in order,
  at most cfg.max_conversations."""
  rows, name = _raw_rows(cfg, split)
  if cfg.max_conversations:
    rows = rows[:cfg.max_conversations]
  if not rows:
    raise DataUnavailableError(f"{name} holds no conversations")
  return [_conversation(row, cfg, f"{name} row {i}") for i, row in enumerate(rows)]


def held_out(count: int, total: int) -> np.ndarray:
  """Indices of `count` evenly spaced rows of `total` (all but one row at most), ascending."""
  count = min(count, total - 1)
  if count < 1:
    raise ChatDataError(f"cannot hold out validation conversations from {total}; give a "
                        "validation split (val_split) or more conversations")
  return np.arange(count) * total // count + (total // count) // 2


def read_splits(cfg: ChatDataConfig) -> tuple[list[dict], list[dict]]:
  """(training, validation) conversations; with val_split '' the validation ones are held out
  of the training split and never trained on."""
  train = read_conversations(cfg, cfg.train_split)
  if cfg.val_split:
    return train, read_conversations(cfg, cfg.val_split)[:cfg.val_conversations]
  chosen = set(held_out(cfg.val_conversations, len(train)).tolist())
  return ([c for i, c in enumerate(train) if i not in chosen],
          [c for i, c in enumerate(train) if i in chosen])
