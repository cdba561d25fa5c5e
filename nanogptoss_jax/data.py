"""TinyStories text -> cached token streams -> Grain batches of next-token windows."""

import dataclasses
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator

import datasets
import grain
import numpy as np
from huggingface_hub import constants as hub_constants
from huggingface_hub import utils as hub_utils
from tqdm import tqdm

from nanogptoss_jax.run_config import DataConfig
from nanogptoss_jax.tokenizer import (ENCODE_THREADS, ENCODING_NAME, ENDOFTEXT, FullTokenizer,
                                      Tokenizer, base_encoding, count_base_ids,
                                      tokenizer_from_config)

# Bump when the cache layout or the text -> tokens recipe changes, so old files are not reused.
CACHE_FORMAT = 1
TOKEN_DTYPE = np.dtype(np.uint32)
KEY_HEX_CHARS = 16
STORIES_PER_BATCH = 2048  # per encode_ordinary_batch call: enough work for every thread
MAP_CHUNK_TOKENS = 1 << 24  # base -> model ids in chunks, so int64 temporaries stay ~128 MB
# Each story is followed by <|endoftext|>; we count it as the one byte (a newline) that would
# separate stories in plain text, so bits-per-byte charges the end-of-story prediction to a byte.
SEPARATOR_BYTES = 1
HUB_PROBE_TIMEOUT_S = 3.0
# Grain reads a few batches ahead in threads; a small buffer bounds memory for big batches.
READ_THREADS = 2
PREFETCH_BATCHES = 4
# A .txt split file is found by this word in its name (TinyStories-train.txt, ...-valid.txt).
SPLIT_FILE_WORDS = {"train": "train", "validation": "valid", "valid": "valid", "val": "valid",
                    "test": "test"}
TXT_SPLITS = ("train", "validation", "test")  # the names an error lists as available
# A snapshot of the hub repo holds .txt files *and* data/*.parquet; datasets reads the latter,
# which is what the hub id gives, so a directory with data/ is never read as .txt files.
HUB_DATA_DIR = "data"
LOCAL_PATH_HINT = ("--config.data.path=DIR pointing at a local copy: a dataset directory laid out "
                   "like the hub repo (e.g. ../shared/data/tinystories/hf), a TinyStories .txt "
                   "file, or a directory of *train*.txt / *valid*.txt files")


class DataUnavailableError(RuntimeError):
  """The configured text source (path, hub, split or column) cannot be read."""


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One split as a flat id stream plus how many bytes of text it stands for."""

  ids: np.ndarray  # [N] uint32, often a read-only memmap
  n_bytes: int

  @property
  def bytes_per_token(self) -> float:
    """Average UTF-8 bytes per id; turns nats/token into bits-per-byte."""
    return self.n_bytes / len(self.ids)


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where one split's stories come from, and what identifies that content for the cache."""

  kind: str  # "txt", "local" (a datasets directory) or "hub"
  location: str  # the .txt file, the dataset directory or the hub id
  identity: dict
  name: str  # readable stem for cache file names


# --------------------------------------------------------------------------- sources


def _looks_like_hub_id(path: str) -> bool:
  """'name' or 'owner/name', nothing that reads as a file path."""
  return (re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) is not None and not path.startswith(".")
          and not path.endswith(".txt"))


def _file_stat(path: str) -> list:
  stat = os.stat(path)
  return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _split_word(split: str) -> str:
  return SPLIT_FILE_WORDS.get(split, split)


def _txt_file_for_split(path: str, split: str) -> str:
  """The .txt file holding split: path itself, or its sibling named with the split's word."""
  directory, name = os.path.split(os.path.abspath(path))
  wanted = _split_word(split)
  words_in_name = [word for word in sorted(set(SPLIT_FILE_WORDS.values())) if word in name]
  # A file named after no split (stories.txt) is training text.
  if wanted in name or (not words_in_name and wanted == SPLIT_FILE_WORDS["train"]):
    return path
  # TinyStoriesV2-GPT4-train.txt -> TinyStoriesV2-GPT4-valid.txt, so one path names both splits.
  for word in words_in_name:
    sibling = os.path.join(directory, name.replace(word, wanted))
    if os.path.isfile(sibling):
      return sibling
  raise DataUnavailableError(
      f"split {split!r}: {path} has no sibling .txt file with {wanted!r} in its name; point "
      "--config.data.path at a directory holding *train*.txt and *valid*.txt files")


def _txt_files_in(directory: str) -> list[str]:
  return sorted(glob.glob(os.path.join(directory, "*.txt")))


def _txt_file_in_dir(directory: str, split: str) -> str:
  """The one *{word}*.txt file of split in directory."""
  wanted = _split_word(split)
  matches = [f for f in _txt_files_in(directory) if wanted in os.path.basename(f)]
  if not matches:
    names = [os.path.basename(f) for f in _txt_files_in(directory)]
    available = [split_name for split_name in TXT_SPLITS
                 if any(_split_word(split_name) in name for name in names)]
    raise DataUnavailableError(
        f"split {split!r}: no *{wanted}*.txt file in {directory}; splits available there: "
        f"{available}")
  if len(matches) > 1:
    # The hub repo holds V1 and V2 side by side; silently concatenating them would mix datasets.
    raise DataUnavailableError(
        f"split {split!r}: several *{wanted}*.txt files in {directory}: "
        f"{[os.path.basename(f) for f in matches]}; set --config.data.path to one of them (its "
        "validation sibling is found by name)")
  return matches[0]


def _dataset_dir_files(directory: str) -> list[list]:
  """(path, size, mtime) of every non-hidden file under a local dataset directory."""
  stats = []
  for root, dirs, files in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    stats.extend(_file_stat(os.path.join(root, f)) for f in sorted(files)
                 if not f.startswith("."))
  return stats


def _resolve_source(cfg: DataConfig, split: str) -> _Source:
  """Decides what kind of source cfg.path is and what content identity keys its cache."""
  path = cfg.path
  common = {"split": split, "max_stories": cfg.max_stories, "encoding": ENCODING_NAME,
            "format": CACHE_FORMAT}
  if os.path.isfile(path) and path.endswith(".txt"):
    txt_file = _txt_file_for_split(path, split)
  elif os.path.isdir(path) and _txt_files_in(path) and not os.path.isdir(
      os.path.join(path, HUB_DATA_DIR)):
    txt_file = _txt_file_in_dir(path, split)
  elif os.path.isdir(path):
    identity = {**common, "local": _dataset_dir_files(path), "column": cfg.text_column}
    return _Source("local", path, identity, os.path.basename(os.path.abspath(path)))
  elif os.path.exists(path):
    raise DataUnavailableError(f"{path} is neither a .txt file nor a directory; "
                               f"use {LOCAL_PATH_HINT}")
  elif _looks_like_hub_id(path):
    # Keyed by name, not revision: asking the hub for its revision would make every warm start
    # need the network. TinyStories does not change; clear the cache if a hub dataset does.
    identity = {**common, "hub": path, "column": cfg.text_column}
    return _Source("hub", path, identity, path.replace("/", "_"))
  else:
    raise DataUnavailableError(f"data path {path} does not exist and is not a Hugging Face "
                               f"dataset id (owner/name); use {LOCAL_PATH_HINT}")
  identity = {**common, "txt": _file_stat(txt_file)}
  return _Source("txt", txt_file, identity, os.path.splitext(os.path.basename(txt_file))[0])


def _read_txt_stories(txt_file: str) -> Iterator[str]:
  """Stories of an official-format file: text, then a line `<|endoftext|>`, repeated."""
  lines = []
  with open(txt_file, encoding="utf-8") as f:
    for line in itertools.chain(f, [ENDOFTEXT]):  # the sentinel flushes a last unterminated story
      if line.strip() != ENDOFTEXT:
        lines.append(line)
        continue
      # The hub rows are these stories without their trailing newline; strip() makes both agree.
      story = "".join(lines).strip()
      lines = []
      if story:
        yield story


def _hub_unreachable_error(path: str, why: str) -> DataUnavailableError:
  return DataUnavailableError(
      f"{path!r} is not a local path, and the Hugging Face hub could not be reached ({why}). "
      f"Use {LOCAL_PATH_HINT}; or, if it was downloaded before, set HF_HUB_OFFLINE=1 to read "
      "the copy in the Hugging Face cache.")


def _probe_hub(path: str) -> None:
  """Fails in seconds when the hub is unreachable, where datasets would retry for ~25 s."""
  try:
    # huggingface_hub's own client, so HF_ENDPOINT, proxies and certificates apply as they would.
    hub_utils.get_session().head(hub_constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
  except Exception as error:  # Any failure to get an answer means unreachable, whatever the cause.
    raise _hub_unreachable_error(path, f"{type(error).__name__}: {error}") from error


def _load_hf_split(source: _Source, split: str, text_column: str) -> datasets.Dataset:
  """One split of a hub or local `datasets` dataset, after checking the split and column."""
  offline = datasets.config.HF_HUB_OFFLINE
  if source.kind == "hub" and not offline:
    _probe_hub(source.location)
  try:
    splits = datasets.load_dataset(source.location)
  except ConnectionError as error:
    if offline:
      raise DataUnavailableError(
          f"HF_HUB_OFFLINE is set and {source.location!r} is not in the Hugging Face cache "
          f"({error}). Unset HF_HUB_OFFLINE to download it, or use {LOCAL_PATH_HINT}.") from error
    raise _hub_unreachable_error(source.location, str(error)) from error
  except datasets.exceptions.DatasetNotFoundError as error:
    raise DataUnavailableError(f"no local path or hub dataset named {source.location!r} "
                               f"({error})") from error
  if split not in splits:
    raise DataUnavailableError(f"{source.location} has no split {split!r}; available splits: "
                               f"{sorted(splits)}")
  dataset = splits[split]
  if text_column not in dataset.column_names:
    raise DataUnavailableError(f"{source.location} split {split!r} has no column "
                               f"{text_column!r}; available columns: {dataset.column_names}")
  return dataset


def _open_stories(cfg: DataConfig, source: _Source, split: str) -> Iterator[str]:
  """The split's stories (at most cfg.max_stories); a hub or local dataset is opened right away."""
  if source.kind == "txt":
    stories = _read_txt_stories(source.location)
  else:
    # Eager, so a missing split, column or hub fails before any progress bar or cache file.
    dataset = _load_hf_split(source, split, cfg.text_column).select_columns([cfg.text_column])
    stories = itertools.chain.from_iterable(
        batch[cfg.text_column] for batch in dataset.iter(batch_size=STORIES_PER_BATCH))
  if cfg.max_stories > 0:
    stories = itertools.islice(stories, cfg.max_stories)
  return stories


def load_split_texts(cfg: DataConfig, split: str) -> list[str]:
  """All stories of one split (capped by cfg.max_stories), in source order."""
  source = _resolve_source(cfg, split)
  return list(_open_stories(cfg, source, split))


# --------------------------------------------------------------------------- on-disk cache


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:KEY_HEX_CHARS]


def _load_cached(stem: str) -> tuple[TokenStream, dict] | None:
  """The stream saved under stem, or None if absent or inconsistent (a crash mid-write)."""
  try:
    with open(stem + ".json") as f:
      meta = json.load(f)
    complete = (meta["format"] == CACHE_FORMAT and meta["n_tokens"] > 0 and
                os.path.getsize(stem + ".bin") == meta["n_tokens"] * TOKEN_DTYPE.itemsize)
  except (OSError, ValueError, KeyError, TypeError):
    return None
  if not complete:
    return None
  ids = np.memmap(stem + ".bin", dtype=TOKEN_DTYPE, mode="r", shape=(meta["n_tokens"],))
  return TokenStream(ids, meta["n_bytes"]), meta


def _atomic_write(path: str, write) -> None:
  """write(file) into a temp file, then rename: readers see the old file or the whole new one."""
  temp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    with open(temp, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())  # The data must be on disk before the name says the file is done.
    os.replace(temp, path)
  finally:
    if os.path.exists(temp):
      os.remove(temp)


def _save_stream(stem: str, chunks: Iterable[np.ndarray], meta: dict) -> TokenStream:
  """Writes chunks as one uint32 file plus a JSON sidecar; meta gains n_tokens from the write."""
  n_tokens = 0

  def write_ids(f):
    nonlocal n_tokens
    for chunk in chunks:
      f.write(np.ascontiguousarray(chunk, dtype=TOKEN_DTYPE).tobytes())
      n_tokens += chunk.size

  _atomic_write(stem + ".bin", write_ids)
  if n_tokens == 0:
    os.remove(stem + ".bin")
    raise DataUnavailableError(f"no stories found in {meta['source']}")
  meta = {**meta, "format": CACHE_FORMAT, "n_tokens": n_tokens}
  # The sidecar goes last: its presence, with a matching size, marks the .bin as complete.
  _atomic_write(stem + ".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
  stream, _ = _load_cached(stem)
  return stream


# --------------------------------------------------------------------------- tokenisation


def _encode_stories(stories: list[str]) -> list[list[int]]:
  """o200k_harmony ids of each story, in parallel threads; special tokens stay plain text."""
  return base_encoding().encode_ordinary_batch(stories, num_threads=ENCODE_THREADS)


def _tokenize(stories: Iterator[str], description: str, tally: dict) -> Iterator[np.ndarray]:
  """Base ids of every story with <|endoftext|> after each; adds stories and bytes to tally."""
  eot = base_encoding().encode_single_token(ENDOFTEXT)
  with tqdm(desc=f"tokenising {description}", unit="tok", unit_scale=True) as progress:
    while stories_batch := list(itertools.islice(stories, STORIES_PER_BATCH)):
      token_lists = _encode_stories(stories_batch)
      for tokens in token_lists:
        tokens.append(eot)
      ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=TOKEN_DTYPE)
      tally["n_stories"] += len(stories_batch)
      tally["n_bytes"] += (sum(len(story.encode()) for story in stories_batch)
                           + SEPARATOR_BYTES * len(stories_batch))
      progress.update(ids.size)
      progress.set_postfix(stories=tally["n_stories"])
      yield ids


def _base_stream_and_stem(cfg: DataConfig, split: str) -> tuple[TokenStream, str]:
  """The split's base-id stream, from the cache or tokenised now, and its cache stem."""
  source = _resolve_source(cfg, split)
  stem = os.path.join(cfg.cache_dir, f"{source.name}-{split}-{_hash(source.identity)}")
  cached = _load_cached(stem)
  if cached is not None:
    logging.info("loaded %d cached tokens of %s %s from %s", cached[1]["n_tokens"],
                 source.location, split, stem)
    return cached[0], stem
  stories = _open_stories(cfg, source, split)
  os.makedirs(cfg.cache_dir, exist_ok=True)
  meta = {"source": f"{source.kind} {source.location} split {split}", "identity": source.identity,
          "tokenizer": ENCODING_NAME, "n_stories": 0, "n_bytes": 0}
  # _tokenize fills meta's tallies while _save_stream drains it, before the sidecar is written.
  return _save_stream(stem, _tokenize(stories, f"{source.name} {split}", meta), meta), stem


def base_token_stream(cfg: DataConfig, split: str) -> TokenStream:
  """One split as o200k_harmony ids, each story followed by <|endoftext|>; cached on disk."""
  return _base_stream_and_stem(cfg, split)[0]


def _model_stream(base: TokenStream, base_stem: str, tokenizer: Tokenizer) -> TokenStream:
  """base mapped to the tokenizer's model ids; cached beside the base stream."""
  if isinstance(tokenizer, FullTokenizer):
    return base  # model ids are base ids: no copy of a multi-GB stream
  stem = f"{base_stem}-vocab{tokenizer.vocab_size}-{_hash(tokenizer.to_dict())}"
  cached = _load_cached(stem)
  if cached is not None:
    return cached[0]
  # Mapping is token-local (each base id becomes its own run), so chunks map independently.
  chunks = (tokenizer.from_base_ids(base.ids[start:start + MAP_CHUNK_TOKENS])
            for start in range(0, len(base.ids), MAP_CHUNK_TOKENS))
  meta = {"source": f"{base_stem}.bin mapped to vocab {tokenizer.vocab_size}",
          "n_bytes": base.n_bytes}
  return _save_stream(stem, chunks, meta)


def _count_base_ids(ids: np.ndarray) -> np.ndarray:
  """count_base_ids over a long (memmapped) stream, chunk by chunk."""
  return sum(count_base_ids(ids[start:start + MAP_CHUNK_TOKENS])
             for start in range(0, len(ids), MAP_CHUNK_TOKENS))


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None
                 ) -> tuple[Tokenizer, TokenStream, TokenStream]:
  """(tokenizer, train stream, validation stream) in model ids; builds the tokenizer if None."""
  train_base, train_stem = _base_stream_and_stem(cfg, cfg.train_split)
  val_base, val_stem = _base_stream_and_stem(cfg, cfg.val_split)
  if tokenizer is None:
    # Only a compact vocabulary needs the counts; a resumed run passes its saved tokenizer.
    counts = _count_base_ids(train_base.ids) if cfg.compact_vocab_size else None
    tokenizer = tokenizer_from_config(cfg.compact_vocab_size, counts)
  return (tokenizer, _model_stream(train_base, train_stem, tokenizer),
          _model_stream(val_base, val_stem, tokenizer))


# --------------------------------------------------------------------------- windows


def _num_windows(stream: TokenStream, context_len: int) -> int:
  """How many (context_len + 1)-token windows fit at stride context_len."""
  if context_len < 1:
    raise ValueError(f"context_len must be positive, got {context_len}")
  count = (len(stream.ids) - 1) // context_len
  if count < 1:
    raise ValueError(f"the token stream has {len(stream.ids)} tokens, fewer than one window of "
                     f"context_len + 1 = {context_len + 1}; use more data or a shorter context")
  return count


def make_train_dataset(stream: TokenStream, context_len: int, batch_size: int, seed: int, *,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """Endless shuffled batches [batch_size // process_count, context_len + 1] of int32 ids."""
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of process_count "
                     f"({process_count})")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
  local_batch = batch_size // process_count
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  offsets = np.arange(context_len + 1)
  ids = stream.ids

  def gather_windows(window_indices: np.ndarray) -> np.ndarray:
    # Every process draws the same global batch of window indices and keeps its rows of it.
    starts = window_indices[rows].astype(np.int64) * context_len
    return ids[starts[:, None] + offsets].astype(np.int32)  # [B, T + 1]

  # Grain's shuffle reseeds with seed + epoch for indices past the first epoch, so repeat()
  # gives a fresh order every epoch; batches may straddle two epochs.
  return (grain.MapDataset.range(_num_windows(stream, context_len))
          .shuffle(seed=seed)
          .repeat()
          .batch(batch_size, drop_remainder=True)
          .map(gather_windows))


def make_train_iterator(stream: TokenStream, context_len: int, batch_size: int, seed: int, *,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An iterator over make_train_dataset; get_state() is {'next_index': int} (JSON-able)."""
  dataset = make_train_dataset(stream, context_len, batch_size, seed,
                               process_index=process_index, process_count=process_count)
  read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  return iter(dataset.to_iter_dataset(read_options))


def val_windows(stream: TokenStream, context_len: int, num_windows: int) -> np.ndarray:
  """Up to num_windows fixed int32 windows [n, context_len + 1], evenly spaced over stream."""
  if num_windows < 1:
    raise ValueError(f"num_windows must be positive, got {num_windows}")
  available = _num_windows(stream, context_len)
  count = min(num_windows, available)
  # Integer spacing of at least one window, so the windows never repeat.
  starts = (np.arange(count) * available // count) * context_len
  return stream.ids[starts[:, None] + np.arange(context_len + 1)].astype(np.int32)  # [n, T + 1]
