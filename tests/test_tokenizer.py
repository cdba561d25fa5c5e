"""Tokenizer properties: o200k_harmony facts, lossless round trips, the compact subset's shape."""

import json

import numpy as np
import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogptoss_jax.data import bpe
from nanogptoss_jax.data import tokenizer as tokenizer_lib

N_VOCAB = 201088
STARTOFTEXT_ID = 199998
ENDOFTEXT_ID = 199999
RETURN_ID = 200002
# Encoded by OpenAI's own tokenizer, an independent reference for our loading of the BPE file.
KNOWN_SENTENCE = "Once upon a time, there was a little girl named Lily."
KNOWN_IDS = [18049, 7557, 261, 1058, 11, 1354, 673, 261, 3389, 8881, 11484, 72406, 13]
# Enough real text for stable word counts, little enough to encode in a blink.
SAMPLE_CHARS = 200_000
COMPACT_VOCAB_SIZE = 2048
NUM_RANDOM_TEXTS = 200
AWKWARD_TEXTS = [
    "",
    " ",
    "\n\n\t \r\n",
    "Héllo wörld, naïve café — “quotes” and ‘apostrophes’…",
    "数学是科学的皇后。日本語のテキスト、한국어 텍스트.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 keycap 1️⃣",
    "\u0301 lone combining acute, e\u0301 decomposed, \u200b zero width, \ufeff BOM",
    "def f(x):\n\tif x:\n\t\treturn {'a': [1, 2]}  # tab-indented\n",
    "<|endoftext|><|return|>",
    "<|startoftext|>Once<|endoftext|>",
    "\x00\x01\x7f control bytes",
    "â€œmojibakeâ€\u009d as served by the hub",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 astral 𐍈",
]


@pytest.fixture(scope="module")
def encoding() -> tiktoken.Encoding:
  return tokenizer_lib.base_encoding()


@pytest.fixture(scope="module")
def sample_text(tinystories_dir) -> str:
  with open(tinystories_dir / "TinyStories-train.txt", encoding="utf-8") as file:
    return file.read(SAMPLE_CHARS)


@pytest.fixture(scope="module")
def sample_counts(encoding, sample_text) -> np.ndarray:
  return tokenizer_lib.count_base_ids(np.array(encoding.encode_ordinary(sample_text)))


@pytest.fixture(scope="module")
def compact(sample_counts) -> tokenizer_lib.CompactTokenizer:
  return tokenizer_lib.build_compact_tokenizer(sample_counts, COMPACT_VOCAB_SIZE)


@pytest.fixture(scope="module")
def full() -> tokenizer_lib.FullTokenizer:
  return tokenizer_lib.FullTokenizer()


def test_o200k_harmony_facts(encoding):
  assert encoding.name == tokenizer_lib.ENCODING_NAME
  assert encoding.n_vocab == N_VOCAB
  assert encoding.eot_token == ENDOFTEXT_ID
  assert encoding.encode_single_token("<|startoftext|>") == STARTOFTEXT_ID
  assert encoding.encode_single_token("<|return|>") == RETURN_ID
  assert encoding.encode_ordinary(KNOWN_SENTENCE) == KNOWN_IDS


def test_full_round_trip_and_plain_specials(full, encoding):
  assert (full.vocab_size, full.eot_id, full.stop_ids) == (N_VOCAB, ENDOFTEXT_ID,
                                                           (ENDOFTEXT_ID, RETURN_ID))
  assert full.encode(KNOWN_SENTENCE) == KNOWN_IDS
  for text in AWKWARD_TEXTS:
    assert full.decode(full.encode(text)) == text
  special_text_ids = full.encode("<|endoftext|><|return|>")
  assert ENDOFTEXT_ID not in special_text_ids and RETURN_ID not in special_text_ids
  assert full.decode([ENDOFTEXT_ID]) == "<|endoftext|>"
  assert full.encode_batch(AWKWARD_TEXTS) == [full.encode(text) for text in AWKWARD_TEXTS]


def test_full_rejects_ids_outside_vocab(full):
  with pytest.raises(ValueError, match="201088"):
    full.from_base_ids(np.array([0, N_VOCAB]))
  with pytest.raises(ValueError):
    full.decode([-1])


def test_compact_round_trips_awkward_texts(compact):
  for text in AWKWARD_TEXTS:
    ids = compact.encode(text)
    assert compact.decode(ids) == text
    assert all(0 <= token < compact.vocab_size for token in ids)
  assert compact.encode_batch(AWKWARD_TEXTS) == [compact.encode(text) for text in AWKWARD_TEXTS]
  assert compact.encode_batch([]) == [] and compact.encode_batch(["", ""]) == [[], []]


@settings(max_examples=NUM_RANDOM_TEXTS, deadline=None)
@given(text=st.text())
def test_compact_round_trips_random_text(compact, text):
  ids = compact.encode(text)
  assert compact.decode(ids) == text
  assert compact.decode(np.array(ids, dtype=np.uint32)) == text
  assert all(0 <= token < compact.vocab_size for token in ids)


def test_compact_round_trips_real_stories(compact, encoding, sample_text):
  # The data pipeline's path: the whole stream, <|endoftext|> included, through from_base_ids.
  base_ids = np.array(encoding.encode(sample_text, allowed_special={"<|endoftext|>"}))
  model_ids = compact.from_base_ids(base_ids)
  assert model_ids.dtype == np.uint32
  assert model_ids.max() < compact.vocab_size
  assert compact.decode(model_ids) == sample_text
  assert np.count_nonzero(model_ids == compact.eot_id) == np.count_nonzero(base_ids == ENDOFTEXT_ID)


def test_from_base_ids_agrees_with_encode(compact, encoding):
  for text in AWKWARD_TEXTS + [KNOWN_SENTENCE]:
    from_base = compact.from_base_ids(np.array(encoding.encode_ordinary(text), dtype=np.int64))
    assert from_base.tolist() == compact.encode(text)


def test_compact_shape(compact, encoding, sample_counts):
  assert compact.vocab_size == COMPACT_VOCAB_SIZE
  # Byte b is model id b.
  byte_ids = [encoding.encode_single_token(bytes([value])) for value in range(256)]
  assert compact.from_base_ids(np.array(byte_ids)).tolist() == list(range(256))
  # Every kept ordinary token is at least as frequent as every dropped one.
  fixed = set(tokenizer_lib.fixed_base_ids().tolist())
  frequent = [base for base in compact.base_ids.tolist() if base not in fixed]
  dropped = np.ones(N_VOCAB, dtype=bool)
  dropped[compact.base_ids] = False
  assert sample_counts[frequent].min() >= sample_counts[dropped].max()
  assert np.all(np.diff(sample_counts[frequent]) <= 0)


def test_frequent_words_are_single_ids_and_rare_ones_bytes(compact, encoding):
  for word in [" the", " Lily", "Once", " happy", "."]:
    assert len(compact.encode(word)) == 1, word
  rare = " photosynthesis Schrödinger"
  base_ids = encoding.encode_ordinary(rare)
  assert all(compact.base_to_model[base] < 0 for base in base_ids)  # Precondition: all rare.
  assert compact.encode(rare) == list(rare.encode("utf-8"))


def test_stop_ids_decode_to_their_names(compact):
  assert compact.decode([compact.eot_id]) == "<|endoftext|>"
  assert [compact.decode([stop]) for stop in compact.stop_ids] == ["<|endoftext|>", "<|return|>"]
  assert compact.eot_id < compact.vocab_size


def test_to_dict_json_from_dict_is_identical(compact, full):
  for original in (compact, full):
    rebuilt = tokenizer_lib.Tokenizer.from_dict(json.loads(json.dumps(original.to_dict())))
    assert type(rebuilt) is type(original)
    assert (rebuilt.vocab_size, rebuilt.eot_id, rebuilt.stop_ids) == (
        original.vocab_size, original.eot_id, original.stop_ids)
    assert rebuilt.encode_batch(AWKWARD_TEXTS) == original.encode_batch(AWKWARD_TEXTS)
  with pytest.raises(ValueError, match="encoding"):
    tokenizer_lib.Tokenizer.from_dict({"kind": "full", "encoding": "gpt2"})


def test_too_small_vocab_names_the_minimum(sample_counts):
  minimum = len(tokenizer_lib.fixed_base_ids())
  with pytest.raises(ValueError, match=str(minimum)):
    tokenizer_lib.build_compact_tokenizer(sample_counts, minimum - 1)
  assert tokenizer_lib.build_compact_tokenizer(sample_counts, minimum).vocab_size == minimum


def test_unseen_ids_fill_the_requested_size():
  counts = np.zeros(N_VOCAB, dtype=np.int64)
  seen = [1000, 5000, 123456]
  counts[seen] = [3, 7, 1]
  small = tokenizer_lib.build_compact_tokenizer(counts, 400)
  assert small.vocab_size == 400
  num_fixed = len(tokenizer_lib.fixed_base_ids())
  assert small.base_ids[num_fixed:num_fixed + 3].tolist() == [5000, 1000, 123456]
  # The rest are the lowest ids not already kept.
  fill = small.base_ids[num_fixed + 3:]
  unused = np.setdiff1d(np.arange(N_VOCAB), small.base_ids[:num_fixed + 3])
  assert fill.tolist() == unused[:fill.size].tolist()
  for text in AWKWARD_TEXTS:
    assert small.decode(small.encode(text)) == text


def test_tokenizer_from_config(sample_counts):
  assert isinstance(tokenizer_lib.tokenizer_from_config(0, None), tokenizer_lib.FullTokenizer)
  compact = tokenizer_lib.tokenizer_from_config(512, sample_counts)
  assert isinstance(compact, tokenizer_lib.CompactTokenizer) and compact.vocab_size == 512
  with pytest.raises(ValueError, match="base_counts"):
    tokenizer_lib.tokenizer_from_config(512, None)


def test_unavailable_bpe_file_raises_a_helpful_error(monkeypatch, tmp_path):
  def offline(blobpath):
    raise ConnectionError(f"no network for {blobpath}")  # An OSError, as requests raises offline.

  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
  monkeypatch.setattr(tiktoken.load, "read_file", offline)
  # tiktoken keeps loaded encodings too; monkeypatch puts this one back afterwards.
  monkeypatch.delitem(tiktoken.registry.ENCODINGS, tokenizer_lib.ENCODING_NAME, raising=False)
  # No local BPE file either (an earlier test may have read a run directory's copy).
  monkeypatch.setattr(bpe, "_local_bpe_files", [])
  tokenizer_lib.base_encoding.cache_clear()
  try:
    with pytest.raises(bpe.TokenizerUnavailableError, match="tokenizer_path") as info:
      tokenizer_lib.base_encoding()
    assert isinstance(info.value.__cause__, ConnectionError)
  finally:
    tokenizer_lib.base_encoding.cache_clear()


def test_from_base_ids_matches_a_token_by_token_reference(compact, encoding):
  # Random ids over the whole vocabulary, reserved specials included, against a plain loop.
  base_ids = np.random.default_rng(0).integers(0, N_VOCAB, size=2000)
  base_ids[::7] = compact.base_ids[:base_ids[::7].size]  # Mix in ids that are kept.
  expected = []
  for base in base_ids.tolist():
    if compact.base_to_model[base] >= 0:
      expected.append(int(compact.base_to_model[base]))
    else:
      expected.extend(encoding.decode_single_token_bytes(base))  # Byte b is model id b.
  assert compact.from_base_ids(base_ids).tolist() == expected
  assert compact.from_base_ids(np.array([], dtype=np.int64)).size == 0
