"""What text to train on and how it becomes tokens; and the error for a source that cannot be read."""

import dataclasses

from nanogptoss_jax.errors import UserError


class DataUnavailableError(UserError, RuntimeError):
  """The configured text source (path, hub, split or column) cannot be read."""


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
