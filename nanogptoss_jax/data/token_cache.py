"""The on-disk token cache: one uint32 file per stream plus a JSON sidecar, written atomically."""

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Iterable

import numpy as np

from nanogptoss_jax.data.config import DataUnavailableError

# Bump when the cache layout or the text -> tokens recipe changes, so old files are not reused.
CACHE_FORMAT = 1
TOKEN_DTYPE = np.dtype(np.uint32)
KEY_HEX_CHARS = 16


@dataclasses.dataclass(frozen=True)
class TokenStream:
  """One split as a flat id stream plus how many bytes of text it stands for."""

  ids: np.ndarray  # [N] uint32, often a read-only memmap
  n_bytes: int

  @property
  def bytes_per_token(self) -> float:
    """Average UTF-8 bytes per id; turns nats/token into bits-per-byte."""
    return self.n_bytes / len(self.ids)


def cache_key(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:KEY_HEX_CHARS]


def load_cached(stem: str) -> tuple[TokenStream, dict] | None:
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


def atomic_write(path: str, write) -> None:
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


def save_stream(stem: str, chunks: Iterable[np.ndarray], meta: dict) -> TokenStream:
  """Writes chunks as one uint32 file plus a JSON sidecar; meta gains n_tokens from the write."""
  n_tokens = 0

  def write_ids(f):
    nonlocal n_tokens
    for chunk in chunks:
      f.write(np.ascontiguousarray(chunk, dtype=TOKEN_DTYPE).tobytes())
      n_tokens += chunk.size

  atomic_write(stem + ".bin", write_ids)
  if n_tokens == 0:
    os.remove(stem + ".bin")
    raise DataUnavailableError(f"no stories found in {meta['source']}")
  meta = {**meta, "format": CACHE_FORMAT, "n_tokens": n_tokens}
  # The sidecar goes last: its presence, with a matching size, marks the .bin as complete.
  atomic_write(stem + ".json", lambda f: f.write(json.dumps(meta, indent=1).encode()))
  stream, _ = load_cached(stem)
  return stream

