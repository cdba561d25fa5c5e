"""What text to train on and how it becomes tokens; and the error for a source that cannot be read."""

import dataclasses

from nanogptoss_jax.errors import UserError

TRAIN_TURNS = ("last", "all")
TOO_LONG = ("drop", "cut")


class DataUnavailableError(UserError, RuntimeError):
  """The configured text source (path, hub, split or column) cannot be read."""


class ChatDataError(UserError, ValueError):
  """A conversation that cannot be trained on (malformed row, no assistant turn, unknown role)."""


@dataclasses.dataclass(frozen=True)
class ChatDataConfig:
  """Where the conversations come from and how they become training examples."""

  # A .jsonl file (one {"messages": [...]} object per line: the training split), a directory
  # of <split>.jsonl files, a local `datasets` directory, or a hub dataset id such as
  # HuggingFaceH4/Multilingual-Thinking. "": the run trains on plain text (DataConfig.path).
  path: str = ""
  train_split: str = "train"
  # "": hold out `val_conversations` evenly spaced conversations of the training split instead
  # (never trained on), for sources with one split.
  val_split: str = "validation"
  val_conversations: int = 64  # the held-out count, or the cap on the validation split
  messages_column: str = "messages"
  tools_column: str = "tools"  # optional: the OpenAI function specs a conversation may call
  reasoning_effort: str = "medium"  # a row's own "reasoning_effort" key wins
  current_date: str = ""  # "": harmony's system message without a date
  # "last": the last assistant turn (its reasoning too), earlier turns as history.
  # "all": every assistant turn, each rendered as the last of its own example.
  train_turns: str = "last"
  too_long: str = "drop"  # conversations longer than the context: "drop" or "cut" (counted)
  max_conversations: int = 0  # per split; 0: all

  def __post_init__(self):
    for name, allowed in (("train_turns", TRAIN_TURNS), ("too_long", TOO_LONG)):
      if getattr(self, name) not in allowed:
        raise ChatDataError(f"chat data {name} must be one of {', '.join(allowed)}, "
                            f"got {getattr(self, name)!r}")
    if self.val_conversations < 1 or self.max_conversations < 0:
      raise ChatDataError("chat data val_conversations must be positive and max_conversations "
                          f">= 0 (got {self.val_conversations}, {self.max_conversations})")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes tokens."""

  # A hub dataset id, a local dataset directory (anything `datasets.load_dataset` reads), a
  # `.txt` file with `<|endoftext|>` separators, or a directory holding `*train*.txt`/`*valid*.txt`.
  path: str = "roneneldan/TinyStories"
  train_split: str = "train"
  val_split: str = "validation"
  text_column: str = "text"
  # Tokenised streams are cached here (uint32, memory-mapped), keyed by source and tokenizer.
  cache_dir: str = ".cache/nanogptoss"
  # o200k_base.tiktoken, or a directory holding it; "": tiktoken's cache or its download.
  tokenizer_path: str = ""
  # 0: the full o200k_harmony vocabulary. N > 0: a lossless compact vocabulary of N ids.
  compact_vocab_size: int = 0
  # Validation uses this many fixed windows (fewer if the split is short).
  val_windows: int = 64
  # Cap on stories read per split (0: all); handy to try the full hub dataset quickly.
  max_stories: int = 0
  # Harmony conversations to fine-tune on instead of text (chat.path set): the loss covers the
  # assistant turn's sampled tokens only, and evaluation is their loss on the held-out chats.
  chat: ChatDataConfig = ChatDataConfig()

  @property
  def is_chat(self) -> bool:
    return bool(self.chat.path)
