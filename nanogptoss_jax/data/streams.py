"""Text -> o200k_harmony ids -> the model's ids, cached on disk: what training and evaluation read."""

import itertools
import logging
import os
from collections.abc import Iterator

import numpy as np

from nanogptoss_jax.data.bpe import use_bpe_file
from nanogptoss_jax.data.config import DataConfig
from nanogptoss_jax.data.sources import STORIES_PER_BATCH, open_stories, resolve_source
from nanogptoss_jax.data.token_cache import (TOKEN_DTYPE, TokenStream, cache_key, load_cached,
                                             save_stream)
from nanogptoss_jax.data.tokenizer import (ENCODE_THREADS, FullTokenizer, Tokenizer,
                                           base_encoding, count_base_ids, tokenizer_from_config)
from nanogptoss_jax.o200k import ENCODING_NAME, ENDOFTEXT
from nanogptoss_jax.progress import progress_bar

MAP_CHUNK_TOKENS = 1 << 24  # base -> model ids in chunks, so int64 temporaries stay ~128 MB
# Each story is followed by <|endoftext|>; we count it as the one byte (a newline) that would
# separate stories in plain text, so bits-per-byte charges the end-of-story prediction to a byte.
SEPARATOR_BYTES = 1


def _encode_stories(stories: list[str]) -> list[list[int]]:
  """o200k_harmony ids of each story, in parallel threads; special tokens stay plain text."""
  return base_encoding().encode_ordinary_batch(stories, num_threads=ENCODE_THREADS)


def _tokenize(stories: Iterator[str], description: str, tally: dict) -> Iterator[np.ndarray]:
  """Base ids of every story with <|endoftext|> after each; adds stories and bytes to tally."""
  eot = base_encoding().encode_single_token(ENDOFTEXT)
  with progress_bar(desc=f"tokenising {description}", unit="tok", unit_scale=True) as progress:
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
  source = resolve_source(cfg, split)
  stem = os.path.join(cfg.cache_dir, f"{source.name}-{split}-{cache_key(source.identity)}")
  cached = load_cached(stem)
  if cached is not None:
    logging.info("loaded %d cached tokens of %s %s from %s", cached[1]["n_tokens"],
                 source.location, split, stem)
    return cached[0], stem
  stories = open_stories(cfg, source, split)
  os.makedirs(cfg.cache_dir, exist_ok=True)
  meta = {"source": f"{source.kind} {source.location} split {split}", "identity": source.identity,
          "tokenizer": ENCODING_NAME, "n_stories": 0, "n_bytes": 0}
  # _tokenize fills meta's tallies while save_stream drains it, before the sidecar is written.
  return save_stream(stem, _tokenize(stories, f"{source.name} {split}", meta), meta), stem


def base_token_stream(cfg: DataConfig, split: str) -> TokenStream:
  """One split as o200k_harmony ids, each story followed by <|endoftext|>; cached on disk."""
  return _base_stream_and_stem(cfg, split)[0]


def _model_stream(base: TokenStream, base_stem: str, tokenizer: Tokenizer) -> TokenStream:
  """base mapped to the tokenizer's model ids; cached beside the base stream."""
  if isinstance(tokenizer, FullTokenizer):
    return base  # model ids are base ids: no copy of a multi-GB stream
  stem = f"{base_stem}-vocab{tokenizer.vocab_size}-{cache_key(tokenizer.to_dict())}"
  cached = load_cached(stem)
  if cached is not None:
    return cached[0]
  # Mapping is token-local (each base id becomes its own run), so chunks map independently.
  chunks = (tokenizer.from_base_ids(base.ids[start:start + MAP_CHUNK_TOKENS])
            for start in range(0, len(base.ids), MAP_CHUNK_TOKENS))
  meta = {"source": f"{base_stem}.bin mapped to vocab {tokenizer.vocab_size}",
          "n_bytes": base.n_bytes}
  return save_stream(stem, chunks, meta)


def _count_base_ids(ids: np.ndarray) -> np.ndarray:
  """count_base_ids over a long (memmapped) stream, chunk by chunk."""
  return sum(count_base_ids(ids[start:start + MAP_CHUNK_TOKENS])
             for start in range(0, len(ids), MAP_CHUNK_TOKENS))


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer | None = None
                 ) -> tuple[Tokenizer, TokenStream, TokenStream]:
  """(tokenizer, train stream, validation stream) in model ids; builds the tokenizer if None."""
  if cfg.tokenizer_path:
    use_bpe_file(cfg.tokenizer_path)
  train_base, train_stem = _base_stream_and_stem(cfg, cfg.train_split)
  val_base, val_stem = _base_stream_and_stem(cfg, cfg.val_split)
  if tokenizer is None:
    # Only a compact vocabulary needs the counts; a resumed run passes its saved tokenizer.
    counts = _count_base_ids(train_base.ids) if cfg.compact_vocab_size else None
    tokenizer = tokenizer_from_config(cfg.compact_vocab_size, counts)
  return (tokenizer, _model_stream(train_base, train_stem, tokenizer),
          _model_stream(val_base, val_stem, tokenizer))

