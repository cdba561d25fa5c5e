"""Autoregressive sampling with a KV cache: one jitted prefill, then one jitted while_loop.

The prompts (right-padded, padding at position -1) fill the cache in one call; a second call
runs `lax.while_loop` over an explicit state (cache, last token, positions, stop flags, output
buffer) until every row stopped or `max_new_tokens` were drawn, so nothing is traced per token.
Shapes are bucketed (prompt length to a power of two, cache length to a multiple of
CACHE_LENGTH_MULTIPLE) and both functions are jitted once per model structure and bucket.
Per step the sampler never sorts the vocabulary (top-k uses lax.top_k, top-p alone a bisection)
and draws with one uniform number per row (see `draw`), so the unembedding dominates.
"""

import collections
import dataclasses
import sys
from collections.abc import Callable, Sequence
from functools import partial

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.attention import LayerCache

MIN_PROMPT_BUCKET = 16  # prefill lengths are powers of two from here, so few shapes compile
CACHE_LENGTH_MULTIPLE = 64  # cache lengths are rounded up to this
OUTPUT_LENGTH_MULTIPLE = 64  # and the output buffer: max_new_tokens=100 or 101 compile once
STREAM_CHUNK_TOKENS = 8  # tokens per jitted call when streaming (the first call draws one)
# o200k_harmony's <|endoftext|> and <|return|>; used when they fit in the model's vocabulary.
DEFAULT_STOP_TOKENS = (199999, 200002)
PAD_TOKEN = 0  # fills the padded prompt tail and finished rows; at position -1 it is never stored
NO_TOKEN = -1  # output-buffer entry for steps after a row stopped
PADDING_POSITION = -1
DRAW_BLOCK = 512  # tokens per block in the two-level draw (about sqrt(201k))
NUCLEUS_CANDIDATES = 256  # top-p alone looks for its nucleus among this many tokens first
KEY_BITS = 32  # bisection steps that pin a float32's sortable key exactly
SIGN_BIT = 1 << 31  # of a float32 seen as a uint32
MIN_STOP_SLOTS = 4  # stop ids are padded to a power of two >= this: few counts compile

# How often each jitted function was traced (a test checks that a bucket is traced once).
TRACE_COUNTS = collections.Counter()


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The static (compile-time) part of the sampler; temperature, top_p and stop ids are traced."""

  greedy: bool
  top_k: int | None
  use_top_p: bool


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


def _sortable_keys(x: jax.Array) -> jax.Array:
  """uint32 keys in the same order as the float32 values x (-inf lowest, +inf highest)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  # Negative floats order backwards as integers: flip all their bits; lift positives above them.
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(SIGN_BIT))


def _nucleus_sorted(values: jax.Array, top_p) -> jax.Array:
  """Descending logits [B, C] with -inf after the smallest prefix holding mass >= top_p."""
  probs = jax.nn.softmax(values, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  # A token joins while the tokens before it hold less than top_p; the first always does.
  # top_p = 1 keeps everything, also the tail after a cumsum that rounded up to 1.
  return jnp.where((mass_before < top_p) | (top_p >= 1), values, -jnp.inf)


def _bisect_boundary(logits: jax.Array, top_p) -> jax.Array:
  """[B, 1] the smallest logit of the top-p nucleus, by bisection over all V logits.

  The nucleus is every token whose logit is >= the largest threshold t with
  mass(logit >= t) >= top_p; 32 halvings over order-preserving uint32 keys pin t exactly.
  """
  probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
  keys = _sortable_keys(logits)
  # Invariant: mass(keys >= low) >= top_p > mass(keys >= high).
  low = keys.min(axis=-1)  # everything: mass 1
  high = keys.max(axis=-1) + 1  # nothing: mass 0 (no overflow: +inf's key is below 2**32 - 1)

  def halve(_, bounds):
    low, high = bounds
    middle = low + (high - low) // 2
    mass = jnp.sum(jnp.where(keys >= middle[:, None], probs, 0.0), axis=-1)
    reaches = mass >= top_p
    return jnp.where(reaches, middle, low), jnp.where(reaches, high, middle)

  low, _ = jax.lax.fori_loop(0, KEY_BITS, halve, (low, high))
  return jnp.min(jnp.where(keys >= low[:, None], logits, jnp.inf), axis=-1, keepdims=True)


def _nucleus(logits: jax.Array, top_p) -> jax.Array:
  """Logits [B, V] with -inf outside the top-p nucleus, without sorting V.

  A full sort of a 201k vocabulary costs more than a whole decode step on a CPU. The nucleus
  usually lies within the NUCLEUS_CANDIDATES most likely tokens (one lax.top_k); when it does
  not, a bisection finds it. Either way the cut is a logit value, so tokens tied with the last
  one are all kept (a sort would keep some of them).
  """
  candidates = min(NUCLEUS_CANDIDATES, logits.shape[-1])
  values, _ = jax.lax.top_k(logits, candidates)  # [B, C], descending
  probs = jnp.exp(values - jax.nn.logsumexp(logits, axis=-1, keepdims=True))  # of the full V
  count = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p, axis=-1)  # [B], >= 1
  boundary = jnp.take_along_axis(values, count[:, None] - 1, axis=-1)  # [B, 1]
  # count == C means the nucleus may go on past the candidates (unless they are all of V, or
  # top_p = 1 keeps everything anyway: no bisection over V for that common "off" value).
  found = jnp.all(count < candidates) | (candidates == logits.shape[-1]) | (top_p >= 1)
  boundary = jax.lax.cond(found, lambda: boundary, lambda: _bisect_boundary(logits, top_p))
  # top_p = 1 keeps everything, also any tail after a cumulative sum that rounded up to 1.
  return jnp.where((logits >= boundary) | (top_p >= 1), logits, -jnp.inf)


def _candidates(logits: jax.Array, top_k: int | None, top_p) -> tuple[jax.Array, jax.Array | None]:
  """(values [B, C], their token ids [B, C], or None when C = V and values are the logits)."""
  if top_k is not None and top_k < logits.shape[-1]:
    # Exactly k survivors even with ties (a `>= k-th value` threshold would keep every tie).
    values, indices = jax.lax.top_k(logits, top_k)  # [B, k], descending
    return values if top_p is None else _nucleus_sorted(values, top_p), indices
  if top_p is not None:
    return _nucleus(logits, top_p), None
  return logits, None


def filter_logits(logits: jax.Array, top_k: int | None = None,
                  top_p: float | jax.Array | None = None) -> jax.Array:
  """Logits [B, V] with -inf outside the k largest, then outside the top-p nucleus of those.

  The nucleus is the smallest set of most likely tokens (renormalised after top-k) whose mass
  reaches top_p; it always holds at least one token. Ties: top-k keeps exactly k; without
  top_k, tokens tied at the nucleus boundary are all kept.
  """
  values, indices = _candidates(logits, top_k, top_p)
  if indices is None:
    return values
  rows = jnp.arange(logits.shape[0])[:, None]
  return jnp.full_like(logits, -jnp.inf).at[rows, indices].set(values)


def _first_or_last(condition: jax.Array, positive: jax.Array) -> jax.Array:
  """[B] index of the first True in condition [B, N], else of the last True in positive."""
  last = positive.shape[-1] - 1 - jnp.argmax(positive[:, ::-1], axis=-1)
  return jnp.where(condition.any(axis=-1), jnp.argmax(condition, axis=-1), last)


def draw(key: jax.Array, logits: jax.Array) -> jax.Array:
  """One index per row drawn with probability softmax(logits [B, C]): [B] int32.

  Inverse-CDF sampling in two levels (the block, then the token inside it): one uniform number
  per row, where jax.random.categorical makes (and sums) one Gumbel number per logit, which
  costs as much as a 201k-vocabulary forward step. Never returns an index whose logit is -inf.
  """
  batch, size = logits.shape
  block = min(DRAW_BLOCK, size)
  blocks = -(-size // block)
  padded = jnp.pad(logits, ((0, 0), (0, blocks * block - size)), constant_values=-jnp.inf)
  peak = jnp.max(padded, axis=-1, keepdims=True)  # [B, 1]
  probs = jnp.exp(padded - peak).reshape(batch, blocks, block)  # [B, G, K], unnormalised
  block_mass = probs.sum(axis=-1)  # [B, G]
  block_end = jnp.cumsum(block_mass, axis=-1)  # [B, G]
  target = jax.random.uniform(key, (batch,)) * block_end[:, -1]  # [B]
  # Rounding can leave the target at or past the last boundary, or make a zero-mass block look
  # like a step: asking for positive mass as well rules both out.
  chosen = _first_or_last((block_end > target[:, None]) & (block_mass > 0), block_mass > 0)
  inside = jnp.take_along_axis(probs, chosen[:, None, None], axis=1)[:, 0]  # [B, K]
  offset = target - (jnp.take_along_axis(block_end, chosen[:, None], axis=1)[:, 0]
                     - jnp.take_along_axis(block_mass, chosen[:, None], axis=1)[:, 0])
  token = _first_or_last((jnp.cumsum(inside, axis=-1) > offset[:, None]) & (inside > 0),
                         inside > 0)
  return (chosen * block + token).astype(jnp.int32)


def sample_tokens(logits: jax.Array, key: jax.Array, settings: SamplerSettings,
                  temperature: jax.Array, top_p: jax.Array) -> jax.Array:
  """One token per row of logits [B, V] -> [B] int32."""
  if settings.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  # Shifted so the largest logit is 0: a tiny temperature then sends the others to -inf (a
  # greedy draw) instead of overflowing to inf, and inf - inf = NaN, in the softmax. The floor
  # keeps a temperature that rounds to 0 in float32 from making the largest 0 / 0.
  scaled = ((logits - jnp.max(logits, axis=-1, keepdims=True))
            / jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny))
  # With top_k only the k candidates are filtered and drawn from, never a V-sized array again.
  values, indices = _candidates(scaled, settings.top_k, top_p if settings.use_top_p else None)
  choice = draw(key, values)  # [B]
  if indices is None:
    return choice
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


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


def max_positions(cfg) -> int:
  """Longest sequence (prompt + new tokens) the model may hold.

  GPT-2: its learned position table. GPT-OSS has none, but RoPE is meant for the context it
  was configured for, stretched by YaRN's factor (gpt-oss: 4,096 x 32 = 131,072).
  """
  if hasattr(cfg, "max_position_embeddings"):
    return cfg.max_position_embeddings
  return int(cfg.initial_context_length * cfg.rope_scaling_factor)


def default_stop_tokens(vocab_size: int) -> tuple[int, ...]:
  """<|endoftext|> and <|return|> when the vocabulary is o200k_harmony-sized, else none."""
  return tuple(token for token in DEFAULT_STOP_TOKENS if token < vocab_size)


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
  limit = max_positions(cfg)
  if longest + max_new_tokens > limit:
    raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) = "
                     f"{longest + max_new_tokens} exceeds the {limit} positions this model "
                     "supports (GPT-2: max_position_embeddings; GPT-OSS: initial_context_length "
                     "x rope_scaling_factor)")
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
  with key fold_in(key(seed), step). stop_tokens defaults to the model's `stop_tokens` attribute
  (`load_checkpoint` sets it from the checkpoint's tokenizer, whose vocabulary may be compact),
  else to <|endoftext|> and <|return|> when they fit the vocabulary. `callback`, if given, gets
  each step's token per row, None for a row that already stopped or is stopping (the stop token
  itself is never reported).
  """
  cfg = model.cfg
  _check_arguments(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
  if stop_tokens is None:
    stop_tokens = getattr(model, "stop_tokens", None) or default_stop_tokens(cfg.vocab_size)
  stop = tuple(int(t) for t in stop_tokens)
  settings = SamplerSettings(greedy=temperature == 0, top_k=None if top_k is None else int(top_k),
                             use_top_p=top_p is not None and temperature != 0)
  batch = len(prompts)
  lengths = np.array([len(prompt) for prompt in prompts])
  # The prefill takes all but the last prompt token: that one is fed by the first decode step,
  # whose logits then come out of the same compiled step as every later token's.
  bucket = prompt_bucket(int(lengths.max()) - 1)
  cache_length = _round_up(bucket + max_new_tokens, CACHE_LENGTH_MULTIPLE)
  tokens = np.full((batch, bucket), PAD_TOKEN, np.int32)  # [B, T]
  positions = np.full((batch, bucket), PADDING_POSITION, np.int32)  # [B, T]
  for row, prompt in enumerate(prompts):
    tokens[row, :len(prompt) - 1] = prompt[:-1]
    positions[row, :len(prompt) - 1] = np.arange(len(prompt) - 1)

  graphdef, params = nnx.split(model)
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


class _TextStream:
  """Turns a growing id list into text pieces without splitting a multi-byte character."""

  def __init__(self, tokenizer, emit: Callable[[str], None]):
    self.tokenizer, self.emit = tokenizer, emit
    self.ids, self.shown = [], ""

  def add(self, tokens: list[int | None]) -> None:
    if tokens[0] is not None:
      self.ids.append(tokens[0])
      self._show(final=False)

  def _show(self, final: bool) -> None:
    # Decoding the whole list each time keeps shown text exact; a trailing U+FFFD may be a
    # character whose remaining bytes are still to come, so it waits unless this is the end.
    text = self.tokenizer.decode(self.ids)
    if not final:
      text = text.rstrip("\ufffd")
    if len(text) > len(self.shown) and text.startswith(self.shown):
      self.emit(text[len(self.shown):])
      self.shown = text

  def finish(self) -> None:
    self._show(final=True)


def _print_piece(piece: str) -> None:
  sys.stdout.write(piece)
  sys.stdout.flush()


def generate_text(model, tokenizer, prompts: list[str] | str, max_new_tokens: int, *,
                  stream: bool | Callable[[str], None] = False, **kwargs) -> list[str] | str:
  """Text continuations of text prompts (a str gives a str); kwargs go to generate().

  stop_tokens defaults to tokenizer.stop_ids. stream=True prints a single prompt's text to
  stdout as it is drawn; a callable stream receives the text pieces instead.
  """
  single = isinstance(prompts, str)
  texts = [prompts] if single else list(prompts)
  kwargs.setdefault("stop_tokens", tokenizer.stop_ids)
  text_stream = None
  if stream:
    if len(texts) != 1:
      raise ValueError(f"stream needs a single prompt, got {len(texts)}")
    text_stream = _TextStream(tokenizer, _print_piece if stream is True else stream)
    kwargs["callback"] = text_stream.add
  new_tokens = generate(model, [tokenizer.encode(text) for text in texts], max_new_tokens,
                        **kwargs)
  if text_stream is not None:
    text_stream.finish()
  outputs = [tokenizer.decode(tokens) for tokens in new_tokens]
  return outputs[0] if single else outputs
