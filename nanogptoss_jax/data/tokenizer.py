"""o200k_harmony tokenizer, either whole or as a lossless compact subset sized for small models."""

import functools
import itertools

import numpy as np

from nanogptoss_jax.data.bpe import base_encoding
from nanogptoss_jax.o200k import (ENCODING_NAME, ENDOFTEXT, HARMONY_CHANNELS, HARMONY_ROLES,
                                  RETURN)

FULL_KIND = "full"
COMPACT_KIND = "compact"
# o200k_harmony fills its special-token range with ~1,000 placeholders named like this; a small
# vocabulary keeps only the named specials (startoftext, endoftext, return, channel, ...).
RESERVED_MARKER = "reserved"
NUM_BYTES = 256
# tiktoken's default; the BPE core releases the GIL, so threads do encode in parallel.
ENCODE_THREADS = 8


def _read_only(array: np.ndarray) -> np.ndarray:
  array.flags.writeable = False  # Cached and shared, so no caller may edit it in place.
  return array


@functools.cache
def _token_bytes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every base token's bytes, concatenated, as (flat uint8 bytes, offsets, lengths)."""
  encoding = base_encoding()
  pieces = [encoding.decode_single_token_bytes(token) for token in range(encoding.n_vocab)]
  lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
  offsets = np.cumsum(lengths) - lengths
  flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
  return flat, _read_only(offsets), _read_only(lengths)


@functools.cache
def byte_base_ids() -> np.ndarray:
  """Base id of each single byte 0..255; byte-level BPE guarantees all 256 exist."""
  encoding = base_encoding()
  return _read_only(np.array(
      [encoding.encode_single_token(bytes([value])) for value in range(NUM_BYTES)], dtype=np.int64))


@functools.cache
def named_special_base_ids() -> np.ndarray:
  """Base ids of the named (not placeholder) special tokens, ascending."""
  encoding = base_encoding()
  names = [name for name in encoding.special_tokens_set if RESERVED_MARKER not in name]
  return _read_only(np.array(sorted({encoding.encode_single_token(name) for name in names}),
                             dtype=np.int64))


def harmony_header_base_ids() -> np.ndarray:
  """Base ids of the words in harmony's message headers (o200k.HARMONY_ROLES and _CHANNELS)."""
  encoding = base_encoding()
  words = HARMONY_ROLES + HARMONY_CHANNELS
  return _read_only(np.array(sorted({i for w in words for i in encoding.encode_ordinary(w)}),
                             dtype=np.int64))


def fixed_base_ids() -> np.ndarray:
  """What every compact vocabulary keeps whatever the counts: the bytes (so any text can be
  spelt), the named specials, and harmony's header words (so a chat fine-tune's headers are a
  few ids, not ~17 byte ids a small model struggles to learn to spell)."""
  kept = np.concatenate([byte_base_ids(), named_special_base_ids()])
  header = harmony_header_base_ids()
  return _read_only(np.concatenate([kept, header[~np.isin(header, kept)]]))


def _check_ids(ids, n_vocab: int, what: str = "base ids") -> np.ndarray:
  """ids as int64, after checking they are integers in [0, n_vocab)."""
  ids = np.asarray(ids)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {ids.dtype}")
  if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
    raise ValueError(f"{what} must lie in [0, {n_vocab}); got min {ids.min()}, max {ids.max()}")
  return ids.astype(np.int64, copy=False)


def count_base_ids(base_ids: np.ndarray) -> np.ndarray:
  """How often each o200k_harmony id occurs in a stream, as an int64 array of length n_vocab."""
  n_vocab = base_encoding().n_vocab
  return np.bincount(_check_ids(base_ids, n_vocab).ravel(), minlength=n_vocab)


class Tokenizer:
  """Text <-> model ids; subclasses say how model ids relate to o200k_harmony ids."""

  vocab_size: int
  eot_id: int
  stop_ids: tuple[int, ...]

  def __init__(self):
    self.encoding = base_encoding()

  def from_base_ids(self, base_ids: np.ndarray) -> np.ndarray:
    """Maps an o200k_harmony id stream to model ids (uint32), losslessly."""
    raise NotImplementedError

  def to_base_ids(self, ids) -> np.ndarray:
    """Maps model ids back to o200k_harmony ids (int64)."""
    raise NotImplementedError

  def model_lengths(self, base_ids: np.ndarray) -> np.ndarray:
    """How many model ids each base id becomes."""
    raise NotImplementedError

  def to_dict(self) -> dict:
    """A JSON-serialisable description that from_dict rebuilds exactly."""
    raise NotImplementedError

  @staticmethod
  def from_dict(description: dict) -> "Tokenizer":
    """Rebuilds the tokenizer that to_dict described."""
    if description.get("encoding") != ENCODING_NAME:
      raise ValueError(f"tokenizer encoding must be {ENCODING_NAME!r}, "
                       f"got {description.get('encoding')!r}")
    kind = description.get("kind")
    if kind == FULL_KIND:
      return FullTokenizer()
    if kind == COMPACT_KIND:
      return CompactTokenizer(np.asarray(description["base_ids"], dtype=np.int64))
    raise ValueError(f"tokenizer kind must be {FULL_KIND!r} or {COMPACT_KIND!r}, got {kind!r}")

  def encode(self, text: str) -> list[int]:
    """Model ids of text; special-token strings in it are encoded as plain text."""
    # Lossless for every str UTF-8 can hold; tiktoken turns a lone surrogate into U+FFFD.
    return self.from_base_ids(np.asarray(self.encoding.encode_ordinary(text),
                                         dtype=np.int64)).tolist()

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode over many texts, in parallel threads."""
    base_batch = self.encoding.encode_ordinary_batch(texts, num_threads=ENCODE_THREADS)
    # One mapping over the concatenation, then a split: per-text numpy calls cost more than BPE.
    base_ids = np.fromiter(itertools.chain.from_iterable(base_batch), dtype=np.int64)
    model_ids = self.from_base_ids(base_ids).tolist()
    token_ends = np.concatenate([[0], np.cumsum(self.model_lengths(base_ids))])
    text_ends = token_ends[np.cumsum([len(base) for base in base_batch], dtype=np.int64)].tolist()
    return [model_ids[start:end] for start, end in zip([0] + text_ends[:-1], text_ends)]

  def decode(self, ids) -> str:
    """Text of model ids; bytes that are not valid UTF-8 become U+FFFD."""
    base_ids = self.to_base_ids(ids)
    return self.encoding.decode_bytes(base_ids.tolist()).decode("utf-8", errors="replace")


class FullTokenizer(Tokenizer):
  """Model ids are o200k_harmony ids."""

  def __init__(self):
    super().__init__()
    self.vocab_size = self.encoding.n_vocab
    self.eot_id = self.encoding.encode_single_token(ENDOFTEXT)
    self.stop_ids = (self.eot_id, self.encoding.encode_single_token(RETURN))

  def from_base_ids(self, base_ids: np.ndarray) -> np.ndarray:
    """Checks the ids and returns them as a flat uint32 stream."""
    return _check_ids(base_ids, self.vocab_size).ravel().astype(np.uint32)

  def to_base_ids(self, ids) -> np.ndarray:
    """Checks the ids and returns them as int64."""
    return _check_ids(ids, self.vocab_size, "model ids")

  def model_lengths(self, base_ids: np.ndarray) -> np.ndarray:
    """One model id per base id."""
    return np.ones(np.size(base_ids), dtype=np.int64)

  def to_dict(self) -> dict:
    """The full vocabulary needs no id table."""
    return {"kind": FULL_KIND, "encoding": ENCODING_NAME}


class CompactTokenizer(Tokenizer):
  """Model ids index a subset of o200k_harmony ids; a base id outside it is spelt in byte ids."""

  def __init__(self, base_ids: np.ndarray):
    super().__init__()
    n_vocab = self.encoding.n_vocab
    self.base_ids = _check_ids(base_ids, n_vocab).ravel()
    if np.unique(self.base_ids).size != self.base_ids.size:
      raise ValueError("compact base_ids must not repeat an id")
    self.vocab_size = int(self.base_ids.size)
    self.base_to_model = np.full(n_vocab, -1, dtype=np.int64)
    self.base_to_model[self.base_ids] = np.arange(self.vocab_size)
    # Every byte must stay in the vocabulary, else some text could not be spelt at all.
    byte_model_ids = self.base_to_model[byte_base_ids()]
    if np.any(byte_model_ids < 0):
      raise ValueError(f"compact base_ids must include every single-byte token; missing bytes "
                       f"{np.flatnonzero(byte_model_ids < 0).tolist()}")
    stop_model_ids = []
    for name in (ENDOFTEXT, RETURN):
      model_id = int(self.base_to_model[self.encoding.encode_single_token(name)])
      if model_id < 0:
        raise ValueError(f"compact base_ids must include {name}")
      stop_model_ids.append(model_id)
    self.eot_id = stop_model_ids[0]
    self.stop_ids = tuple(stop_model_ids)
    self._build_expansion(byte_model_ids)

  def _build_expansion(self, byte_model_ids: np.ndarray) -> None:
    """Precomputes, for every base id, the run of model ids it becomes, in one flat array."""
    flat_bytes, byte_offsets, byte_lengths = _token_bytes()
    # Absent ids point into every token's spelling in byte ids; present ids into a tail segment
    # holding their single model id. Either way from_base_ids is one gather of variable-size runs.
    present = self.base_to_model >= 0
    present_ids = np.flatnonzero(present)
    self.expansion = np.concatenate([byte_model_ids[flat_bytes],
                                     self.base_to_model[present_ids]]).astype(np.uint32)
    self.expansion_offsets = byte_offsets.copy()
    self.expansion_offsets[present_ids] = flat_bytes.size + np.arange(present_ids.size)
    self.expansion_lengths = np.where(present, 1, byte_lengths)

  def from_base_ids(self, base_ids: np.ndarray) -> np.ndarray:
    """Maps base ids to model ids, spelling ids outside the subset in byte ids; vectorised."""
    base_ids = _check_ids(base_ids, self.base_to_model.size).ravel()
    model_ids = self.base_to_model[base_ids]
    if np.all(model_ids >= 0):
      return model_ids.astype(np.uint32)
    lengths = self.expansion_lengths[base_ids]
    output_starts = np.cumsum(lengths) - lengths
    # Output position p inside token i's run reads expansion[offset_i + (p - output_start_i)].
    shift = np.repeat(self.expansion_offsets[base_ids] - output_starts, lengths)
    return self.expansion[shift + np.arange(shift.size)]

  def to_base_ids(self, ids) -> np.ndarray:
    """Looks model ids up in the kept subset."""
    return self.base_ids[_check_ids(ids, self.vocab_size, "model ids")]

  def model_lengths(self, base_ids: np.ndarray) -> np.ndarray:
    """1 for a kept base id, its byte count for one spelt in bytes."""
    return self.expansion_lengths[_check_ids(base_ids, self.base_to_model.size).ravel()]

  def to_dict(self) -> dict:
    """The kept base ids in model-id order."""
    return {"kind": COMPACT_KIND, "encoding": ENCODING_NAME, "base_ids": self.base_ids.tolist()}


def build_compact_tokenizer(base_counts: np.ndarray, vocab_size: int) -> CompactTokenizer:
  """Keeps bytes, named specials, harmony's header words, then the most frequent base ids
  until vocab_size."""
  n_vocab = base_encoding().n_vocab
  base_counts = np.asarray(base_counts)
  if base_counts.shape != (n_vocab,):
    raise ValueError(f"base_counts must have shape ({n_vocab},), got {base_counts.shape}")
  if base_counts.size and base_counts.min() < 0:
    raise ValueError("base_counts must be non-negative")
  fixed = fixed_base_ids()
  if not fixed.size <= vocab_size <= n_vocab:
    raise ValueError(f"compact vocab_size must lie in [{fixed.size}, {n_vocab}] (the minimum "
                     f"holds {NUM_BYTES} bytes, the named specials and harmony's header words), "
                     f"got {vocab_size}")
  is_candidate = np.ones(n_vocab, dtype=bool)
  is_candidate[fixed] = False
  candidates = np.flatnonzero(is_candidate)
  # Descending count, ties by smaller id; unseen ids (count 0) fill any room left, lowest first,
  # so the model's vocabulary is exactly the size its config says.
  order = np.lexsort((candidates, -base_counts[candidates].astype(np.int64)))
  chosen = candidates[order[:vocab_size - fixed.size]]
  return CompactTokenizer(np.concatenate([fixed, chosen]))


def tokenizer_from_config(compact_vocab_size: int, base_counts: np.ndarray | None) -> Tokenizer:
  """FullTokenizer when compact_vocab_size is 0, else a compact one built from base_counts."""
  if compact_vocab_size == 0:
    return FullTokenizer()
  if compact_vocab_size < 0:
    raise ValueError(f"compact_vocab_size must be 0 (full vocabulary) or positive, "
                     f"got {compact_vocab_size}")
  if base_counts is None:
    raise ValueError("a compact vocabulary needs base_counts from the training data")
  return build_compact_tokenizer(base_counts, compact_vocab_size)
