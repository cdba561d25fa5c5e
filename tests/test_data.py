"""Text sources, the token-stream cache, training windows and data errors."""

import glob
import json
import os
import signal
import time

import datasets
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants

from nanogptoss_jax.data import streams
from nanogptoss_jax.data.config import DataConfig, DataUnavailableError
from nanogptoss_jax.data.sources import load_split_texts
from nanogptoss_jax.data.streams import base_token_stream, prepare_data
from nanogptoss_jax.data.token_cache import TokenStream
from nanogptoss_jax.data.windows import make_train_dataset, make_train_iterator, val_windows
from nanogptoss_jax.data.tokenizer import base_encoding

STORIES = 200  # enough to span several encode batches' worth of logic, quick to tokenise
EOT = 199999  # o200k_harmony <|endoftext|>
HUB_ID = "roneneldan/TinyStories"
# No test may hang CI: anything touching the hub must finish well inside this.
HUB_DEADLINE_S = 20
HUB_FAIL_FAST_S = 10.0
# A closed local port: connecting is refused at once, as when no network is there.
CLOSED_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture
def deadline():
  """Fails the test with TimeoutError instead of letting it hang."""
  def on_alarm(signum, frame):
    raise TimeoutError(f"test exceeded {HUB_DEADLINE_S} s")
  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.alarm(HUB_DEADLINE_S)
  yield
  signal.alarm(0)
  signal.signal(signal.SIGALRM, previous)


def _config(path, tmp_path, **overrides) -> DataConfig:
  settings = {"cache_dir": str(tmp_path / "cache"), "max_stories": STORIES, **overrides}
  return DataConfig(path=str(path), **settings)


# --------------------------------------------------------------------------- sources and cache


def test_hf_dir_and_txt_file_give_the_same_stream(tinystories_dir, tmp_path):
  # The README says both hold the same stories in the same order; the .txt adds only newlines.
  hf = _config(tinystories_dir / "hf", tmp_path)
  txt = _config(tinystories_dir / "TinyStories-train.txt", tmp_path)
  txt_dir = _config(tinystories_dir, tmp_path)
  assert load_split_texts(hf, "train") == load_split_texts(txt, "train")
  for split in ("train", "validation"):
    from_hf = base_token_stream(hf, split)
    from_txt = base_token_stream(txt, split)
    np.testing.assert_array_equal(from_hf.ids, from_txt.ids)
    np.testing.assert_array_equal(from_hf.ids, base_token_stream(txt_dir, split).ids)
    assert from_hf.n_bytes == from_txt.n_bytes


def test_hub_snapshot_dir_is_read_through_datasets(tinystories_dir, tmp_path):
  # Laid out like the hub repo: V1 and V2 .txt files beside data/*.parquet.
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  (snapshot / "data").symlink_to(tinystories_dir / "hf" / "data")
  for name in ("TinyStories-train.txt", "TinyStoriesV2-GPT4-train.txt"):
    (snapshot / name).symlink_to(tinystories_dir / "TinyStories-train.txt")
  np.testing.assert_array_equal(base_token_stream(_config(snapshot, tmp_path), "train").ids,
                                base_token_stream(_config(tinystories_dir, tmp_path), "train").ids)
  # Without data/, two *train*.txt files are ambiguous; naming one file settles it.
  (snapshot / "data").unlink()
  with pytest.raises(DataUnavailableError, match="several"):
    base_token_stream(_config(snapshot, tmp_path), "train")


def test_every_story_is_followed_by_endoftext(tinystories_dir, tmp_path):
  cfg = _config(tinystories_dir / "hf", tmp_path)
  texts = load_split_texts(cfg, "validation")
  stream = base_token_stream(cfg, "validation")
  assert len(texts) == STORIES
  expected = []
  for text in texts:
    expected += base_encoding().encode_ordinary(text) + [EOT]
  np.testing.assert_array_equal(stream.ids, np.array(expected, dtype=np.uint32))
  assert stream.ids.dtype == np.uint32
  assert stream.n_bytes == sum(len(text.encode()) + 1 for text in texts)
  assert stream.bytes_per_token == pytest.approx(stream.n_bytes / len(expected))


def test_second_call_reads_the_cache_without_tokenising(tinystories_dir, tmp_path, monkeypatch):
  cfg = _config(tinystories_dir / "TinyStories-valid.txt", tmp_path)
  first = base_token_stream(cfg, "validation")

  def fail(*args):
    raise AssertionError("the cache should have been used")
  monkeypatch.setattr(streams, "_encode_stories", fail)
  monkeypatch.setattr(streams, "open_stories", fail)
  second = base_token_stream(cfg, "validation")
  assert isinstance(second.ids, np.memmap)
  np.testing.assert_array_equal(first.ids, second.ids)
  assert first.n_bytes == second.n_bytes
  # Another story cap is other content, hence a separate cache entry.
  with pytest.raises(AssertionError, match="cache should have been used"):
    base_token_stream(_config(tinystories_dir / "TinyStories-valid.txt", tmp_path,
                              max_stories=STORIES + 1), "validation")


def test_partial_cache_files_are_ignored(tinystories_dir, tmp_path):
  cfg = _config(tinystories_dir / "TinyStories-valid.txt", tmp_path)
  reference = np.array(base_token_stream(cfg, "validation").ids)
  [bin_path] = glob.glob(os.path.join(cfg.cache_dir, "*.bin"))
  stem = bin_path[:-len(".bin")]
  # A crashed writer's leftovers, and a .bin cut short under a sidecar that says otherwise.
  for leftover in (bin_path + ".tmp-1-deadbeef", stem + ".json.tmp-1-deadbeef"):
    with open(leftover, "wb") as f:
      f.write(b"\x00garbage")
  with open(bin_path, "r+b") as f:
    f.truncate(os.path.getsize(bin_path) // 2)
  np.testing.assert_array_equal(base_token_stream(cfg, "validation").ids, reference)
  # A .bin whose sidecar never got written (a crash between the two renames) is rebuilt too.
  os.remove(stem + ".json")
  np.testing.assert_array_equal(base_token_stream(cfg, "validation").ids, reference)
  with open(stem + ".json") as f:
    meta = json.load(f)
  assert meta["n_tokens"] == reference.size and meta["n_stories"] == STORIES


def test_prepare_data_full_and_compact(tinystories_dir, tmp_path, monkeypatch):
  cfg = _config(tinystories_dir, tmp_path)
  tokenizer, train, val = prepare_data(cfg)
  assert tokenizer.vocab_size == base_encoding().n_vocab
  np.testing.assert_array_equal(train.ids, base_token_stream(cfg, "train").ids)
  compact_cfg = _config(tinystories_dir, tmp_path, compact_vocab_size=1024)
  compact, compact_train, compact_val = prepare_data(compact_cfg)
  assert compact.vocab_size == 1024
  for base_stream, model_stream in ((train, compact_train), (val, compact_val)):
    assert model_stream.ids.max() < 1024
    assert len(model_stream.ids) >= len(base_stream.ids)  # rare ids are spelt in bytes
    assert model_stream.n_bytes == base_stream.n_bytes
    assert compact.decode(model_stream.ids) == tokenizer.decode(base_stream.ids)  # lossless
  # A resumed run passes its tokenizer; the mapped streams then come from the cache.
  monkeypatch.setattr(type(compact), "from_base_ids", lambda *args: 1 / 0)
  _, again, _ = prepare_data(compact_cfg, compact)
  np.testing.assert_array_equal(again.ids, compact_train.ids)


# --------------------------------------------------------------------------- windows


def _counting_stream(n_tokens: int) -> TokenStream:
  """ids[i] == i, so a window's tokens say exactly where it came from."""
  return TokenStream(np.arange(n_tokens, dtype=np.uint32), n_bytes=4 * n_tokens)


def test_windows_are_strided_and_overlap_by_one_token():
  context_len, batch_size = 8, 4
  stream = _counting_stream(101)  # (101 - 1) // 8 = 12 windows, 4 tokens unused
  dataset = make_train_dataset(stream, context_len, batch_size, seed=0)
  batches = [dataset[step] for step in range(3)]  # exactly one epoch
  for batch in batches:
    assert batch.shape == (batch_size, context_len + 1) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)  # contiguous tokens
  epoch = np.concatenate(batches)
  windows = epoch[np.argsort(epoch[:, 0])]
  np.testing.assert_array_equal(windows[:, 0], np.arange(12) * context_len)  # each window once
  np.testing.assert_array_equal(windows[:-1, -1], windows[1:, 0])  # i ends where i + 1 starts


def test_shuffle_is_deterministic_per_seed_and_changes_every_epoch():
  stream = _counting_stream(8 * 40 + 1)  # 40 windows of 8: an epoch is 10 batches of 4

  def epoch_order(seed, epoch):
    dataset = make_train_dataset(stream, 8, 4, seed)
    return np.concatenate([dataset[step][:, 0] for step in range(10 * epoch, 10 * epoch + 10)])

  first = epoch_order(0, 0)
  np.testing.assert_array_equal(first, epoch_order(0, 0))
  assert sorted(first) == sorted(epoch_order(0, 1))  # same windows...
  assert not np.array_equal(first, epoch_order(0, 1))  # ...in a new order
  assert not np.array_equal(first, epoch_order(1, 0))
  assert not np.array_equal(first, np.sort(first))


def test_process_slices_make_up_the_global_batch():
  stream = _counting_stream(8 * 30 + 1)
  whole = make_train_dataset(stream, 8, 6, seed=3)
  parts = [make_train_dataset(stream, 8, 6, seed=3, process_index=p, process_count=2)
           for p in range(2)]
  for step in (0, 1, 7):
    assert parts[0][step].shape == (3, 9)
    np.testing.assert_array_equal(np.concatenate([part[step] for part in parts]), whole[step])
  with pytest.raises(ValueError, match="multiple of process_count"):
    make_train_dataset(stream, 8, 5, seed=3, process_count=2)


def test_iterator_state_round_trip():
  stream = _counting_stream(8 * 10 + 1)  # short, so the 8 batches cross epochs
  iterator = make_train_iterator(stream, 8, 4, seed=5)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  restored = make_train_iterator(stream, 8, 4, seed=5)
  restored.set_state(json.loads(json.dumps(state)))  # must survive a JSON checkpoint
  for want in expected:
    np.testing.assert_array_equal(next(restored), want)


def test_val_windows_are_fixed_and_evenly_spaced():
  stream = _counting_stream(8 * 100 + 1)
  windows = val_windows(stream, 8, 10)
  assert windows.shape == (10, 9) and windows.dtype == np.int32
  np.testing.assert_array_equal(windows[:, 0], np.arange(10) * 80)
  np.testing.assert_array_equal(windows, val_windows(stream, 8, 10))
  assert val_windows(_counting_stream(8 * 3 + 1), 8, 10).shape == (3, 9)  # fewer if short


def test_stream_shorter_than_a_window_is_refused():
  with pytest.raises(ValueError, match="fewer than one window"):
    make_train_dataset(_counting_stream(8), 8, 2, seed=0)
  with pytest.raises(ValueError, match="fewer than one window"):
    val_windows(_counting_stream(8), 8, 4)


# --------------------------------------------------------------------------- errors


def test_missing_local_path(tmp_path):
  for missing in (tmp_path / "nowhere", tmp_path / "stories.txt"):
    with pytest.raises(DataUnavailableError, match="does not exist"):
      base_token_stream(_config(missing, tmp_path), "train")


def test_unreachable_hub_fails_fast_with_the_local_option(tmp_path, monkeypatch, deadline):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(hub_constants, "ENDPOINT", CLOSED_ENDPOINT)
  start = time.perf_counter()
  with pytest.raises(DataUnavailableError, match="could not be reached") as error:
    base_token_stream(_config(HUB_ID, tmp_path), "train")
  assert time.perf_counter() - start < HUB_FAIL_FAST_S
  assert "--config.data.path=DIR" in str(error.value)
  assert not glob.glob(str(tmp_path / "cache" / "*"))  # nothing half-made was left behind


def test_offline_mode_without_a_cached_copy(tmp_path, monkeypatch, deadline):
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  with pytest.raises(DataUnavailableError, match="HF_HUB_OFFLINE") as error:
    base_token_stream(_config("nanogptoss-tests/no-such-dataset", tmp_path), "train")
  assert "--config.data.path=DIR" in str(error.value)


def test_missing_column_lists_the_columns(tinystories_dir, tmp_path):
  with pytest.raises(DataUnavailableError, match=r"no column 'story'.*\['text'\]"):
    base_token_stream(_config(tinystories_dir / "hf", tmp_path, text_column="story"), "train")


def test_missing_split_lists_the_splits(tinystories_dir, tmp_path):
  with pytest.raises(DataUnavailableError, match=r"no split 'test'.*\['train', 'validation'\]"):
    base_token_stream(_config(tinystories_dir / "hf", tmp_path), "test")
  with pytest.raises(DataUnavailableError, match=r"no \*test\*\.txt.*'train', 'validation'"):
    base_token_stream(_config(tinystories_dir, tmp_path), "test")


def test_non_utf8_text_is_refused_with_its_file_and_byte_offset(tmp_path):
  text = tmp_path / "stories-train.txt"
  good = "Once upon a time.\n<|endoftext|>\nLily ran.\n".encode()
  text.write_bytes(good + b"caf\xe9\n<|endoftext|>\n")  # latin-1, not UTF-8
  cfg = DataConfig(path=str(text), cache_dir=str(tmp_path / "cache"))
  with pytest.raises(DataUnavailableError, match=f"byte {len(good) + 3} is 0xe9"):
    load_split_texts(cfg, "train")
