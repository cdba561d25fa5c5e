"""Log-likelihoods of token rows, in jitted batches whose shapes come from a few buckets.

Every harness request becomes a row: tokens whose last `scored` next-token predictions count.
Rows are sorted longest first and cut into batches; a batch's length is the next power of two
(at least MIN_LENGTH_BUCKET), its row count the largest power of two within `batch_tokens`, so
one shape compiles per length bucket. Rows are right-padded: causal attention keeps padding out
of every real position, and the MoE routes each token alone, so a row scores the same in any
batch.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MIN_LENGTH_BUCKET = 16
# Positions unembedded at a time: logits [B, LOGIT_CHUNK, V] rather than [B, T, V], which for
# gpt-oss's 201k vocabulary at T = 8,192 would be 6.6 GB per row.
LOGIT_CHUNK = 256
PAD_TOKEN = 0  # fills rows past their end; those positions are never read back


@dataclasses.dataclass(frozen=True)
class Row:
  """tokens[1:] predicted from tokens[:-1]; the last `scored` predictions count."""

  tokens: tuple[int, ...]
  scored: int


def length_bucket(length: int) -> int:
  """Padded row length: the next power of two, at least MIN_LENGTH_BUCKET."""
  return max(MIN_LENGTH_BUCKET, 1 << max(length - 1, 0).bit_length())


def rows_per_batch(length: int, batch_tokens: int) -> int:
  """The largest power of two of rows whose padded tokens fit batch_tokens (at least 1)."""
  return 1 << max(batch_tokens // length, 1).bit_length() - 1


def _target_logprobs(graphdef, params, tokens, targets):
  """(log p(target), target is the argmax) [B, T] for inputs tokens [B, T]."""
  model = nnx.merge(graphdef, params)
  model.eval()  # no dropout
  hidden = model.forward(tokens, unembed=False).hidden  # [B, T, D]
  batch, length, width = hidden.shape
  chunk = min(LOGIT_CHUNK, length)
  padded = -(-length // chunk) * chunk  # positions past T are scored and dropped
  hidden = jnp.pad(hidden, ((0, 0), (0, padded - length), (0, 0)))  # [B, T', D]
  targets = jnp.pad(targets, ((0, 0), (0, padded - length)))  # [B, T']

  def one_chunk(args):
    h, t = args  # [B, c, D], [B, c]
    logits = model.unembedding(h).astype(jnp.float32)  # [B, c, V]
    chosen = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]  # [B, c]
    return chosen - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == t

  def by_chunk(x):  # [B, T', ...] -> [T'/c, B, c, ...]
    return jnp.swapaxes(x.reshape(batch, padded // chunk, chunk, *x.shape[2:]), 0, 1)

  def unchunk(x):  # [T'/c, B, c] -> [B, T]
    return jnp.swapaxes(x, 0, 1).reshape(batch, padded)[:, :length]

  logprobs, greedy = jax.lax.map(one_chunk, (by_chunk(hidden), by_chunk(targets)))
  return unchunk(logprobs), unchunk(greedy)


# The model's structure is static: one compiled function per model and batch shape.
_target_logprobs_jit = jax.jit(_target_logprobs, static_argnums=0)


def target_logprobs(model, tokens, targets) -> tuple[np.ndarray, np.ndarray]:
  """(log p(target), target is the argmax) [B, T] for inputs tokens [B, T], jitted per shape."""
  graphdef, params = nnx.split(model)
  return jax.device_get(_target_logprobs_jit(graphdef, params, tokens, targets))


def score_rows(model, rows: list[Row], *, batch_tokens: int,
               progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
  """(sum of the scored log-probabilities, whether each scored target is the argmax) per row,
  in the order given. `progress(n)` is called after each batch with its number of rows."""
  for row in rows:
    if not 0 < row.scored < len(row.tokens):
      raise ValueError(f"a row of {len(row.tokens)} tokens cannot score {row.scored} of them")
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
  graphdef, params = nnx.split(model)
  results: list[tuple[float, bool] | None] = [None] * len(rows)
  start = 0
  while start < len(order):
    length = length_bucket(len(rows[order[start]].tokens) - 1)
    batch = order[start:start + rows_per_batch(length, batch_tokens)]
    size = rows_per_batch(length, batch_tokens)  # padded rows keep one shape per bucket
    tokens = np.full((size, length), PAD_TOKEN, np.int32)  # [B, T]
    targets = np.full((size, length), PAD_TOKEN, np.int32)  # [B, T]
    for slot, index in enumerate(batch):
      row = np.asarray(rows[index].tokens, np.int32)
      tokens[slot, :len(row) - 1], targets[slot, :len(row) - 1] = row[:-1], row[1:]
    logprobs, greedy = jax.device_get(_target_logprobs_jit(graphdef, params, tokens, targets))
    for slot, index in enumerate(batch):
      end = len(rows[index].tokens) - 1
      counted = slice(end - rows[index].scored, end)
      results[index] = (float(np.sum(logprobs[slot, counted], dtype=np.float64)),
                        bool(np.all(greedy[slot, counted])))
    start += len(batch)
    if progress is not None:
      progress(len(batch))
  return results

