"""A teacher's rows on disk, one per training window: what offline distillation reads instead of
running the teacher.

A cache is a folder beside the token cache, `teacher-<data key>-<teacher sha256[:16]>/`, holding
one raw file per field, each [W, T, K] over the W windows of the train stream (window w is
tokens w*T .. w*T+T, the trainer's own cut), and `meta.json` with their shapes, the teacher's
hash and the data it was made from. It is written into a temporary folder renamed into place
when complete, so a reader sees a whole cache or none (a kill -9 mid-write leaves no cache), and
rows are read by window index, so a resumed run reads exactly the rows it would have read.
"""

import hashlib
import json
import os
import pathlib
import shutil
import uuid

import numpy as np

from nanogptoss_jax.data.token_cache import TokenStream, atomic_write, cache_key
from nanogptoss_jax.errors import UserError

FORMAT = 1
META_FILE = "meta.json"
PREFIX = "teacher-"
# The fields each kind of cache holds: ids and the teacher's log-probs there (at tau = 1 for
# top-k), plus the proposal's log-probs for sampled ids (importance weights).
FIELDS = {"top_k": ("ids", "log_probs"), "sampled": ("ids", "log_probs", "proposal_log_probs")}
DTYPES = {"ids": np.int32, "log_probs": np.float32, "proposal_log_probs": np.float32}
HASH_CHUNK = 1 << 24


class TeacherCacheError(UserError, ValueError):
  """No cache for this teacher and data, or one made by another teacher."""


def stream_digest(stream: TokenStream) -> str:
  """sha256 of a token stream's ids: which data a cache's rows belong to."""
  digest = hashlib.sha256()
  ids = np.ascontiguousarray(stream.ids)
  for start in range(0, len(ids), HASH_CHUNK):
    digest.update(ids[start:start + HASH_CHUNK].tobytes())
  return digest.hexdigest()


def data_key(stream_sha256: str, context_len: int, mode: str, k: int, extra: dict) -> dict:
  """What a cache's rows depend on apart from the teacher (extra: e.g. a sampling temperature)."""
  return {"format": FORMAT, "stream_sha256": stream_sha256, "context_len": context_len,
          "mode": mode, "k": k, **extra}


def cache_dir(root: str, key: dict, teacher_sha256: str) -> pathlib.Path:
  return pathlib.Path(root) / f"{PREFIX}{cache_key(key)}-{teacher_sha256[:16]}"


class TeacherRows:
  """A complete cache, memory-mapped; `rows(window_indices)` -> {"teacher_<field>": [n, T, K]}."""

  def __init__(self, folder: pathlib.Path):
    self.folder = folder
    self.meta = json.loads((folder / META_FILE).read_text())
    shape = tuple(self.meta["shape"])  # [W, T, K]
    self.arrays = {name: np.memmap(folder / f"{name}.bin", DTYPES[name], "r", shape=shape)
                   for name in FIELDS[self.meta["key"]["mode"]]}

  def rows(self, window_indices: np.ndarray) -> dict:
    return {f"teacher_{name}": np.asarray(array[window_indices])
            for name, array in self.arrays.items()}


def open_rows(root: str, key: dict, teacher: dict) -> TeacherRows:
  """The cache of `key` made by `teacher` ({"path", "sha256"}); one line if absent or stale."""
  folder = cache_dir(root, key, teacher["sha256"])
  if is_finished(folder):
    return TeacherRows(folder)
  others = sorted(pathlib.Path(root).glob(f"{PREFIX}{cache_key(key)}-*/{META_FILE}"))
  if others:
    made_by = json.loads(others[0].read_text())["teacher"]["sha256"]
    raise TeacherCacheError(
        f"the teacher cache {others[0].parent} was made by a teacher hashing "
        f"{made_by[:12]}..., but train.teacher={teacher['path']} now hashes "
        f"{teacher['sha256'][:12]}...: precompute its rows again (python -m "
        f"nanogptoss_jax.commands.teacher_cache with this config); nothing was overwritten")
  raise TeacherCacheError(
      f"no {key['mode']} teacher cache (k={key['k']}) for this data and train.teacher="
      f"{teacher['path']} under {root}: write it first with `python -m "
      f"nanogptoss_jax.commands.teacher_cache` and this run's config")


def is_finished(folder: pathlib.Path) -> bool:
  """Whether `folder` holds a whole cache (its meta file is written last, then renamed in)."""
  return (folder / META_FILE).is_file()


def write_rows(root: str, key: dict, teacher: dict, num_windows: int, context_len: int,
               fill) -> pathlib.Path:
  """Creates the cache: fill(arrays) writes every row of the writable [W, T, K] memmaps. A
  finished cache is never overwritten (its rows are what runs replay)."""
  folder = cache_dir(root, key, teacher["sha256"])
  if is_finished(folder):
    raise TeacherCacheError(f"{folder} already holds this teacher's rows; nothing was written")
  shape = (num_windows, context_len, key["k"])
  temp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  temp.mkdir(parents=True)
  try:
    arrays = {name: np.memmap(temp / f"{name}.bin", DTYPES[name], "w+", shape=shape)
              for name in FIELDS[key["mode"]]}
    fill(arrays)
    for array in arrays.values():
      array.flush()
    del arrays
    meta = {"key": key, "teacher": teacher, "shape": list(shape)}
    atomic_write(str(temp / META_FILE), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    os.replace(temp, folder)
  finally:
    if temp.exists():
      shutil.rmtree(temp)
  return folder
