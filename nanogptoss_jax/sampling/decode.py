"""Autoregressive sampling with a KV cache: one jitted prefill, then one jitted while_loop.

The prompts (right-padded, padding at position -1) fill the cache in one call; a second call
runs `lax.while_loop` over an explicit state (cache, last token, positions, stop flags, output
buffer) until every row stopped or `max_new_tokens` were drawn, so nothing is traced per token.
Shapes are bucketed (prompt length to a power of two, cache length to a multiple of
CACHE_LENGTH_MULTIPLE) and both functions are jitted once per model structure and bucket.
"""

import collections
from collections.abc import Callable, Sequence
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.model.kv_cache import LayerCache
from nanogptoss_jax.parallel.mesh import traced_on
from nanogptoss_jax.sampling.filters import SamplerSettings, sample_tokens

MIN_PROMPT_BUCKET = 16  # prefill lengths are powers of two from here, so few shapes compile
CACHE_LENGTH_MULTIPLE = 64  # cache lengths are rounded up to this
OUTPUT_LENGTH_MULTIPLE = 64  # and the output buffer: max_new_tokens=100 or 101 compile once
STREAM_CHUNK_TOKENS = 8  # tokens per jitted call when streaming (the first call draws one)
PAD_TOKEN = 0  # fills the padded prompt tail and finished rows; at position -1 it is never stored
NO_TOKEN = -1  # output-buffer entry for steps after a row stopped
PADDING_POSITION = -1
MIN_STOP_SLOTS = 4  # stop ids are padded to a power of two >= this: few counts compile

# How often each jitted function was traced (a test checks that a bucket is traced once).
TRACE_COUNTS = collections.Counter()


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries; shapes stay fixed for the whole generation."""

  cache: list[LayerCache]
  token: jax.Array  # [B] next token to feed (the last one drawn, or the last prompt token)
  position: jax.Array  # [B] position of `token`
  done: jax.Array  # [B] bool: the row drew a stop token
  step: jax.Array  # [] tokens drawn so far (same for all rows)
  output: jax.Array  # [B, N] drawn tokens, NO_TOKEN after a row stopped
  key: jax.Array  # the seed's key; step t draws with fold_in(key, t)

def _inference_model(graphdef, params):
  model = nnx.merge(graphdef, params)
  model.eval()  # no dropout while sampling
  return model


def _prefill(graphdef, params, tokens, positions, *, cache_length):
  """Writes the prompts (all but each row's last token) into a fresh cache."""
  TRACE_COUNTS["prefill"] += 1
  model = _inference_model(graphdef, params)
  cache = model.init_cache(tokens.shape[0], cache_length)
  # Only the cache is returned, so XLA drops the unembedding (the biggest matmul) as dead code.
  return model.forward(tokens, positions, cache).cache


def _decode(graphdef, params, state: DecodeState, limit, temperature, top_p, stop_tokens, *,
            settings: SamplerSettings) -> DecodeState:
  """Feeds the last token and draws the next, until step == limit or every row stopped."""
  TRACE_COUNTS["decode"] += 1
  model = _inference_model(graphdef, params)

  def keep_going(state):
    return (state.step < limit) & ~jnp.all(state.done)

  def step(state):
    # Finished rows still run (fixed shapes) but at a padding position, so they store nothing.
    position = jnp.where(state.done, PADDING_POSITION, state.position)
    out = model.forward(state.token[:, None], position[:, None], state.cache)
    key = jax.random.fold_in(state.key, state.step)
    token = sample_tokens(out.logits[:, 0], key, settings, temperature, top_p)  # [B]
    token = jnp.where(state.done, NO_TOKEN, token)
    done = state.done | jnp.any(token[:, None] == stop_tokens, axis=-1)
    output = jax.lax.dynamic_update_slice(state.output, token[:, None], (0, state.step))
    return DecodeState(cache=out.cache, token=jnp.where(done, PAD_TOKEN, token),
                       position=state.position + 1, done=done, step=state.step + 1,
                       output=output, key=state.key)

  return jax.lax.while_loop(keep_going, step, state)


# The model's structure (graphdef) and sampler settings are static: jit's cache, keyed by them
# and by the argument shapes, holds one compiled function per model kind and bucket.
_prefill_jit = jax.jit(_prefill, static_argnums=0, static_argnames="cache_length")
_decode_jit = jax.jit(_decode, static_argnums=0, static_argnames="settings", donate_argnums=2)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def prompt_bucket(length: int) -> int:
  """Padded prefill length: the next power of two, at least MIN_PROMPT_BUCKET."""
  return max(MIN_PROMPT_BUCKET, 1 << max(length - 1, 0).bit_length())


def prefill_rows(prompts: list[list[int]], batch: int, bucket: int):
  """(tokens, positions) [B, T] of `batch` rows of `bucket` tokens: each prompt but its last
  token at positions 0.., then padding (PAD_TOKEN at PADDING_POSITION, never stored)."""
  tokens = np.full((batch, bucket), PAD_TOKEN, np.int32)  # [B, T]
  positions = np.full((batch, bucket), PADDING_POSITION, np.int32)  # [B, T]
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt) - 1] = prompt[:-1]
    positions[row, :len(prompt) - 1] = np.arange(len(prompt) - 1)
  return tokens, positions


def _is_integer(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_arguments(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens):
  """Raises ValueError for anything generate() cannot honour, before any compiling."""
  vocab = cfg.vocab_size
  if not isinstance(prompts, (list, tuple)) or not prompts:
    raise ValueError("prompts must be a non-empty list of token-id lists")
  for row, prompt in enumerate(prompts):
    ids = np.asarray(prompt)
    if ids.ndim != 1 or ids.size == 0:
      raise ValueError(f"prompt {row} must be a non-empty list of token ids, got {prompt!r}")
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"prompt {row} must hold integer token ids, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab:
      raise ValueError(f"prompt {row} has token ids outside [0, {vocab}): "
                       f"min {ids.min()}, max {ids.max()}")
  if not _is_integer(max_new_tokens) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
  longest = max(len(prompt) for prompt in prompts)
  if longest + max_new_tokens > cfg.max_positions:
    raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = "
                     f"{longest + max_new_tokens} exceeds the {cfg.max_positions} positions this "
                     "model supports (its config's max_positions)")
  if not temperature >= 0:  # also refuses NaN
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
  if top_k is not None and (not _is_integer(top_k) or top_k < 1):
    raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
  if stop_tokens is not None:
    if (not isinstance(stop_tokens, (list, tuple, np.ndarray))
        or not all(map(_is_integer, stop_tokens))):
      raise ValueError(f"stop_tokens must be None or a list of token ids, got {stop_tokens!r}")
    bad = [token for token in stop_tokens if not 0 <= token < vocab]
    if bad:
      raise ValueError(f"stop_tokens must lie in [0, {vocab}), got {bad}")


def _trim(tokens: np.ndarray, stop_tokens: tuple[int, ...]) -> list[int]:
  """A row of the output buffer up to (excluding) its stop token or first empty step."""
  result = []
  for token in tokens.tolist():
    if token == NO_TOKEN or token in stop_tokens:
      break
    result.append(token)
  return result


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             stop_tokens: Sequence[int] | None = None,
             callback: Callable[[list[int | None]], None] | None = None) -> list[list[int]]:
  """New tokens for each prompt, ending before its first stop token (which is not returned).

  temperature 0 is greedy; otherwise logits / temperature, then top_k, then top_p, then a draw
  with key fold_in(key(seed), step). stop_tokens defaults to the model config's `stop_tokens`
  (`load_checkpoint` sets them from the checkpoint's tokenizer; a fresh model has none).
  `callback`, if given, gets each step's token per row, None for a row that already stopped or
  is stopping (the stop token itself is never reported).
  """
  cfg = model.cfg
  _check_arguments(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
  stop = tuple(int(t) for t in (cfg.stop_tokens if stop_tokens is None else stop_tokens))
  settings = SamplerSettings(greedy=temperature == 0, top_k=None if top_k is None else int(top_k),
                             use_top_p=top_p is not None and temperature != 0)
  batch = len(prompts)
  lengths = np.array([len(prompt) for prompt in prompts])
  # The prefill takes all but the last prompt token: that one is fed by the first decode step,
  # whose logits then come out of the same compiled step as every later token's.
  bucket = prompt_bucket(int(lengths.max()) - 1)
  cache_length = _round_up(bucket + max_new_tokens, CACHE_LENGTH_MULTIPLE)
  tokens, positions = prefill_rows(prompts, batch, bucket)

  graphdef, params = nnx.split(model)
  # Traced under the model's mesh: the MoE then runs its experts where they lie.
  with traced_on(params):
    cache = _prefill_jit(graphdef, params, tokens, positions, cache_length=cache_length)
    state = DecodeState(
        cache=cache, token=jnp.asarray([prompt[-1] for prompt in prompts], jnp.int32),
        position=jnp.asarray(lengths - 1, jnp.int32), done=jnp.zeros((batch,), bool),
        step=jnp.zeros((), jnp.int32),
        output=jnp.full((batch, _round_up(max_new_tokens, OUTPUT_LENGTH_MULTIPLE)), NO_TOKEN,
                        jnp.int32),
        key=jax.random.key(seed))
    # Sampler values are traced, so changing them (or which ids stop) compiles nothing new.
    decode = partial(_decode_jit, graphdef, params, settings=settings)
    temperature = jnp.float32(temperature if temperature > 0 else 1.0)  # unused when greedy
    top_p = jnp.float32(1.0 if top_p is None else top_p)
    # Padded with NO_TOKEN, which only finished rows "draw", and they are already done.
    slots = max(MIN_STOP_SLOTS, 1 << max(len(stop) - 1, 0).bit_length())
    stop_array = jnp.asarray(stop + (NO_TOKEN,) * (slots - len(stop)), jnp.int32)  # [slots]
    if callback is None:
      state = decode(state, max_new_tokens, temperature, top_p, stop_array)
      output = np.asarray(state.output)
    else:
      # Positional arguments only: jit keys its cache on how arguments are passed, too.
      output = _stream(lambda state, limit: decode(state, limit, temperature, top_p, stop_array),
                       state, max_new_tokens, stop, callback)
  return [_trim(row, stop) for row in output]


def _stream(decode, state, max_new_tokens, stop, callback) -> np.ndarray:
  """Runs the decode loop a chunk at a time (one compiled function), reporting each step."""
  reported, limit = 0, 1  # a one-token first chunk: the first token shows up quickly
  while True:
    state = decode(state, limit)
    step, done, output = jax.device_get((state.step, state.done, state.output))
    for t in range(reported, int(step)):
      callback([None if token == NO_TOKEN or token in stop else int(token)
                for token in output[:, t]])
    reported = int(step)
    if reported >= max_new_tokens or done.all():
      return output
    limit = min(reported + STREAM_CHUNK_TOKENS, max_new_tokens)
