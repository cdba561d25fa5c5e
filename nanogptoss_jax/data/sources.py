"""Where text comes from: a hub dataset, a local `datasets` directory, or TinyStories `.txt` files."""

import dataclasses
import glob
import itertools
import os
import re
from collections.abc import Iterator

import datasets
from huggingface_hub import constants as hub_constants
from huggingface_hub import utils as hub_utils

from nanogptoss_jax.data.config import DataConfig, DataUnavailableError
from nanogptoss_jax.data.token_cache import CACHE_FORMAT
from nanogptoss_jax.o200k import ENCODING_NAME, ENDOFTEXT

STORIES_PER_BATCH = 2048  # stories per read (and per encode_ordinary_batch call)
HUB_PROBE_TIMEOUT_S = 3.0
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


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one split's stories come from, and what identifies that content for the cache."""

  kind: str  # "txt", "local" (a datasets directory) or "hub"
  location: str  # the .txt file, the dataset directory or the hub id
  identity: dict
  name: str  # readable stem for cache file names


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


def resolve_source(cfg: DataConfig, split: str) -> Source:
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
    return Source("local", path, identity, os.path.basename(os.path.abspath(path)))
  elif os.path.exists(path):
    raise DataUnavailableError(f"{path} is neither a .txt file nor a directory; "
                               f"use {LOCAL_PATH_HINT}")
  elif _looks_like_hub_id(path):
    # Keyed by name, not revision: asking the hub for its revision would make every warm start
    # need the network. TinyStories does not change; clear the cache if a hub dataset does.
    identity = {**common, "hub": path, "column": cfg.text_column}
    return Source("hub", path, identity, path.replace("/", "_"))
  else:
    raise DataUnavailableError(f"data path {path} does not exist and is not a Hugging Face "
                               f"dataset id (owner/name); use {LOCAL_PATH_HINT}")
  identity = {**common, "txt": _file_stat(txt_file)}
  return Source("txt", txt_file, identity, os.path.splitext(os.path.basename(txt_file))[0])


def _utf8_lines(txt_file: str) -> Iterator[str]:
  """The file's lines as text; bytes that are not UTF-8 are refused with their offset."""
  offset = 0
  with open(txt_file, "rb") as f:
    for raw in f:
      try:
        yield raw.decode("utf-8").replace("\r\n", "\n")  # as text mode reads it
      except UnicodeDecodeError as error:
        raise DataUnavailableError(
            f"{txt_file} is not UTF-8 text: byte {offset + error.start} is {raw[error.start]:#04x}; "
            "convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
      offset += len(raw)


def _read_txt_stories(txt_file: str) -> Iterator[str]:
  """Stories of an official-format file: text, then a line `<|endoftext|>`, repeated."""
  lines = []
  # The sentinel flushes a last unterminated story.
  for line in itertools.chain(_utf8_lines(txt_file), [ENDOFTEXT]):
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


def _load_hf_split(source: Source, split: str, text_column: str) -> datasets.Dataset:
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
  except FileNotFoundError as error:  # what datasets raises when the hub answers 404
    if source.kind != "hub":
      raise DataUnavailableError(f"{source.location}: {str(error).splitlines()[0]}") from error
    raise DataUnavailableError(
        f"no local path or hub dataset named {source.location!r} (the hub at "
        f"{hub_constants.ENDPOINT} has no such dataset); check the id, or use "
        f"{LOCAL_PATH_HINT}") from error
  if split not in splits:
    raise DataUnavailableError(f"{source.location} has no split {split!r}; available splits: "
                               f"{sorted(splits)}")
  dataset = splits[split]
  if text_column not in dataset.column_names:
    raise DataUnavailableError(f"{source.location} split {split!r} has no column "
                               f"{text_column!r}; available columns: {dataset.column_names}")
  return dataset


def open_stories(cfg: DataConfig, source: Source, split: str) -> Iterator[str]:
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
  source = resolve_source(cfg, split)
  return list(open_stories(cfg, source, split))

