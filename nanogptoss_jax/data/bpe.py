"""o200k_harmony's encoding, and where its BPE file comes from: a file we were given (a run
directory carries one), tiktoken's cache, or tiktoken's download."""

import base64
import functools
import hashlib
import os
import pathlib
from unittest import mock

import tiktoken
from tiktoken_ext import openai_public

from nanogptoss_jax import o200k
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.o200k import ENCODING_NAME


class TokenizerUnavailableError(UserError, RuntimeError):
  """o200k_harmony's BPE file is neither where we were told, nor in tiktoken's cache, nor
  downloadable."""


# o200k_harmony's merge ranks are o200k_base's; tiktoken downloads this file and checks its hash.
BPE_FILE_NAME = "o200k_base.tiktoken"
BPE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
BPE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
BPE_HINT = ("pass --config.data.tokenizer_path=PATH: the o200k_base.tiktoken file, or a "
            "directory holding it (tiktoken's cache, e.g. ../shared/tiktoken on this project's "
            "machines); online, tiktoken downloads it by itself")
_local_bpe_files: list[pathlib.Path] = []  # tried before tiktoken's own cache and download


def find_bpe_file(path: str | os.PathLike) -> pathlib.Path:
  """The BPE file `path` names: the file, or a directory holding it under its own name or under
  tiktoken's cache key (the SHA-1 of its URL). Its content is checked against OpenAI's hash."""
  path = pathlib.Path(path)
  candidates = [path] if path.is_file() else [
      path / BPE_FILE_NAME, path / hashlib.sha1(BPE_URL.encode()).hexdigest()]
  for candidate in candidates:
    if candidate.is_file():
      if hashlib.sha256(candidate.read_bytes()).hexdigest() != BPE_SHA256:
        raise TokenizerUnavailableError(f"{candidate} is not o200k_base.tiktoken (its SHA-256 "
                                        f"differs from {BPE_SHA256}); {BPE_HINT}")
      return candidate
  raise TokenizerUnavailableError(f"no {BPE_FILE_NAME} at {path} (looked for "
                                  f"{', '.join(map(str, candidates))}); {BPE_HINT}")


def use_bpe_file(path: str | os.PathLike) -> None:
  """Makes base_encoding read the BPE file at `path` (see find_bpe_file) instead of tiktoken's
  cache; the file's content is checked, so every source gives the same encoding."""
  found = find_bpe_file(path).resolve()
  if found not in _local_bpe_files:
    _local_bpe_files.insert(0, found)


def _encoding_from_file(path: pathlib.Path) -> tiktoken.Encoding:
  """o200k_harmony from a local BPE file: tiktoken's own constructor, fed these ranks."""
  ranks = {base64.b64decode(token): int(rank)
           for token, rank in (line.split() for line in path.read_bytes().splitlines() if line)}
  with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *_, **__: ranks):
    return tiktoken.Encoding(**openai_public.o200k_harmony())


def write_bpe_file(directory: str | os.PathLike) -> pathlib.Path:
  """Writes the loaded encoding's BPE file into `directory` (byte-identical to OpenAI's)."""
  ranks = base_encoding()._mergeable_ranks
  data = b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
                  for token, rank in sorted(ranks.items(), key=lambda item: item[1]))
  target = pathlib.Path(directory) / BPE_FILE_NAME
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = target.with_suffix(".tmp")
  temporary.write_bytes(data)
  temporary.replace(target)
  return target


@functools.cache
def base_encoding() -> tiktoken.Encoding:
  """The o200k_harmony encoding, loaded once per process."""
  if _local_bpe_files:
    encoding = _encoding_from_file(_local_bpe_files[0])
  else:
    try:
      encoding = tiktoken.get_encoding(ENCODING_NAME)
    # Offline, requests raises an OSError; no requests, ImportError; a bad download, ValueError.
    except (OSError, ImportError, ValueError) as error:
      raise TokenizerUnavailableError(
          f"{ENCODING_NAME}'s BPE file ({BPE_FILE_NAME}) is not in tiktoken's cache and could "
          f"not be downloaded ({type(error).__name__}); {BPE_HINT}") from error
  # The constants the rest of the code uses without loading the encoding must be its own.
  specials = {name: encoding.encode_single_token(name) for name in o200k.SPECIAL_IDS}
  if encoding.n_vocab != o200k.VOCAB_SIZE or specials != o200k.SPECIAL_IDS:
    raise TokenizerUnavailableError(f"tiktoken's {ENCODING_NAME} has {encoding.n_vocab} ids and "
                                    f"special ids {specials}, not those of nanogptoss_jax.o200k")
  return encoding
