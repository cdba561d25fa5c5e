"""Loss (nats/token) and bits per byte of a model on a text dataset, over fixed windows exactly
like training's validation: the same split, windows and byte count."""

import math

import numpy as np

from nanogptoss_jax.data.config import DataConfig
from nanogptoss_jax.data.streams import base_token_stream
from nanogptoss_jax.data.token_cache import TokenStream
from nanogptoss_jax.data.windows import val_windows
from nanogptoss_jax.evaluation.scoring import target_logprobs
from nanogptoss_jax.progress import progress_bar


def text_windows(tokenizer, data: DataConfig, split: str, context_len: int, windows: int
                 ) -> tuple[np.ndarray, np.ndarray, float]:
  """(windows [n, T + 1] of model ids, loss weights [n, T], bytes per token) of a split."""
  base = base_token_stream(data, split)  # o200k_harmony ids, cached on disk like training's
  stream = TokenStream(tokenizer.from_base_ids(base.ids), base.n_bytes)
  rows = val_windows(stream, context_len, windows)  # [n, T + 1]
  # Plain text: every prediction counts. Chat data weighs only what the model should say
  # (0 for each token of the prompt's turns); its loader fills this in, and bits per byte then
  # needs the bytes of the weighted tokens rather than the split's average.
  weights = np.ones((rows.shape[0], context_len), np.float32)  # [n, T]
  return rows, weights, stream.bytes_per_token


def score_text(model, windows: np.ndarray, weights: np.ndarray, bytes_per_token: float, *,
               batch_size: int, progress: bool = True) -> dict:
  """{"loss": weighted mean nats/token, "bits_per_byte", "tokens", "windows"}; the last batch is
  padded with zero-weight rows, so one shape compiles."""
  total, count = 0.0, 0.0
  for start in progress_bar(range(0, len(windows), batch_size), desc="scoring", unit="batch",
                            disable=not progress):
    rows, weight = windows[start:start + batch_size], weights[start:start + batch_size]
    missing = batch_size - len(rows)
    rows = np.pad(rows, ((0, missing), (0, 0))).astype(np.int32)  # [B, T + 1]
    weight = np.pad(weight, ((0, missing), (0, 0)))  # [B, T]
    logprobs, _ = target_logprobs(model, rows[:, :-1], rows[:, 1:])  # [B, T]
    total -= float(np.sum(logprobs * weight, dtype=np.float64))
    count += float(weight.sum())
  loss = total / count
  return {"loss": loss, "bits_per_byte": loss / math.log(2) / bytes_per_token,
          "tokens": int(count), "windows": len(windows)}
