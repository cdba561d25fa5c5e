"""Sampling: cached decoding equals the full forward, greedy equals argmax recompute, filters,
seeds, stop tokens, argument checks, and no retracing within a shape bucket."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.sampling import decode as sampling
from nanogptoss_jax.sampling import filters, text
from nanogptoss_jax.model.config import Gpt2Config, GptOssConfig
from nanogptoss_jax.model.gpt2 import Gpt2
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.sampling.filters import filter_logits
from nanogptoss_jax.sampling.text import generate_text
from tests.factories import random_module

VOCAB = 97
WINDOW = 8
REL_TOL = 1e-4
# Every generate() call below uses this many new tokens, so tests share compiled functions.
NEW_TOKENS = 12
# Different lengths in one batch (right padding); the second passes the sliding window.
PROMPTS = [[5, 17, 3], [9, 1, 44, 2, 60, 7, 31, 8, 12, 70, 4]]
SAMPLES = 20000  # draws for the frequency checks: ~0.004 standard error on a probability
FULL_LENGTH = 40  # every full (uncached) forward runs at this length: one compile per model


@pytest.fixture(scope="module")
def gptoss():
  cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=VOCAB,
                     hidden_size=32, intermediate_size=16, head_dim=8, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=WINDOW, rope_scaling_factor=1.0)
  return random_module(GptOss, cfg)


@pytest.fixture(scope="module")
def gpt2():
  cfg = Gpt2Config(num_hidden_layers=2, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                   max_position_embeddings=64)
  return Gpt2(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(params=["gptoss", "gpt2"])
def model(request):
  return request.getfixturevalue(request.param)


@nnx.jit
def forward(model, tokens, positions=None, cache=None):
  """model.forward compiled once per shape (eager mode would compile every op per shape)."""
  return model.forward(tokens, positions, cache)


def assert_close(actual, expected, what):
  error = float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))
  assert error <= REL_TOL, f"{what}: relative error {error:.2e}"


def test_cached_forward_matches_full_forward(model):
  """Chunks longer than the window, then single tokens, over a right-padded batch of 40 and 27."""
  lengths = np.array([FULL_LENGTH, 27])
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (2, FULL_LENGTH)).astype(np.int32)
  positions = np.where(np.arange(lengths.max()) < lengths[:, None], np.arange(lengths.max()),
                       -1).astype(np.int32)  # [B, T]; -1 pads the short row
  # The model is causal, so row 1's tail past 27 cannot change its first 27 logits.
  full = forward(model, jnp.asarray(tokens)).logits  # [B, T, V]
  cache = model.init_cache(2, 64)
  # Two 12-token chunks (longer than the window: each write evicts ring entries that the
  # chunk's own first queries still need), then one token at a time.
  bounds = [0, 12, 24] + list(range(25, lengths.max() + 1))
  for start, end in zip(bounds[:-1], bounds[1:]):
    out = forward(model, jnp.asarray(tokens[:, start:end]), jnp.asarray(positions[:, start:end]),
                  cache)
    cache = out.cache
    for row, length in enumerate(lengths):
      stop = min(end, length)
      if start < stop:
        assert_close(out.logits[row, :stop - start], full[row, start:stop],
                     f"row {row}, positions {start}..{stop - 1}")


def argmax_recompute(model, prompts, steps):
  """The reference sampler: a full forward over every whole sequence for each new token."""
  sequences = [list(prompt) for prompt in prompts]
  assert max(map(len, prompts)) + steps <= FULL_LENGTH
  for _ in range(steps):
    # One fixed shape for every step; causality keeps the zero tail out of earlier logits.
    tokens = np.zeros((len(prompts), FULL_LENGTH), np.int32)  # [B, T]
    for row, sequence in enumerate(sequences):
      tokens[row, :len(sequence)] = sequence
    logits = forward(model, jnp.asarray(tokens)).logits
    for row, sequence in enumerate(sequences):
      sequence.append(int(jnp.argmax(logits[row, len(sequence) - 1])))
  return [sequence[len(prompt):] for sequence, prompt in zip(sequences, prompts)]


def test_greedy_generate_equals_argmax_recompute(model):
  expected = argmax_recompute(model, PROMPTS, NEW_TOKENS)
  assert generate(model, PROMPTS, NEW_TOKENS, temperature=0, stop_tokens=[]) == expected


def test_tiny_nucleus_after_top_k_is_greedy(gptoss):
  greedy = generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0, stop_tokens=[])
  sampled = generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0.7, top_k=3, top_p=1e-6,
                     stop_tokens=[])
  assert sampled == greedy


def test_stop_token_ends_only_its_row(gptoss):
  free = generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0, stop_tokens=[])
  # A token that row 0 draws at some step but never before, and that row 1 never draws.
  step = next(t for t, token in enumerate(free[0])
              if t > 0 and token not in free[0][:t] and token not in free[1])
  stop = free[0][step]
  steps = []
  stopped = generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0, stop_tokens=[stop],
                     callback=steps.append)
  assert stopped == [free[0][:step], free[1]]  # the stop token itself is not returned
  assert [s[0] for s in steps] == free[0][:step] + [None] * (NEW_TOKENS - step)
  assert [s[1] for s in steps] == free[1]


def first_new_token_step(tokens):
  """The first step > 0 whose token was not drawn before (a stop there ends the row there)."""
  return next(t for t, token in enumerate(tokens) if t > 0 and token not in tokens[:t])


def test_loop_ends_when_every_row_stopped(gptoss):
  free = generate(gptoss, PROMPTS[:1] * 2, NEW_TOKENS, temperature=0, stop_tokens=[])
  step = first_new_token_step(free[0])
  steps = []
  out = generate(gptoss, PROMPTS[:1] * 2, NEW_TOKENS, temperature=0,
                 stop_tokens=[free[0][step]], callback=steps.append)
  assert out == [free[0][:step]] * 2
  # The callback saw the stop step (as None) and nothing after: the loop ended there.
  assert steps == [[token] * 2 for token in free[0][:step]] + [[None, None]]


def test_seed_decides_the_samples(gptoss):
  # A random-init model's logits are nearly flat: two seeds agreeing on 24 draws from 3 is
  # hopeless. (top_p=1 keeps the compiled sampler of the test above: top_p's value is traced.)
  draw = lambda seed: generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0.7, top_k=3, top_p=1.0,
                               seed=seed, stop_tokens=[])
  first = draw(0)
  assert draw(0) == first
  assert draw(1) != first


def test_no_retrace_within_a_bucket(gptoss):
  generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0)
  before = dict(sampling.TRACE_COUNTS)
  # Other prompt lengths (same bucket), stop ids and streaming reuse the compiled functions.
  generate(gptoss, [[4, 5], list(range(1, 17))], NEW_TOKENS, temperature=0, stop_tokens=[3])
  generate(gptoss, [[7] * 9, [1]], NEW_TOKENS, temperature=0, callback=lambda _: None)
  # So do other token counts: the output buffer and the cache are rounded up.
  generate(gptoss, PROMPTS, NEW_TOKENS + 1, temperature=0)
  assert dict(sampling.TRACE_COUNTS) == before


@pytest.mark.parametrize("temperature", [1e-40, 1e-50])  # subnormal; rounds to 0 in float32
@pytest.mark.parametrize("top_k", [None, 3])
def test_tiny_temperature_is_greedy_not_nan(gptoss, temperature, top_k):
  greedy = generate(gptoss, PROMPTS, NEW_TOKENS, temperature=0, stop_tokens=[])
  assert generate(gptoss, PROMPTS, NEW_TOKENS, temperature=temperature, top_k=top_k,
                  stop_tokens=[]) == greedy


def test_default_stop_tokens_come_from_the_model(gptoss):
  """load_checkpoint sets the config's stop_tokens from the tokenizer (a compact vocabulary
  numbers <|endoftext|> differently); generate stops at them by default, none without."""
  greedy = generate(gptoss, PROMPTS[:1], NEW_TOKENS, temperature=0)[0]
  assert len(greedy) == NEW_TOKENS  # the fixture's config has no stop ids: no ids hard-coded
  # The fixture's weights, with stop ids in the config.
  model = random_module(GptOss, gptoss.cfg.replace(stop_tokens=(greedy[3],)))
  expected = greedy[:greedy.index(greedy[3])]  # up to its first occurrence
  assert generate(model, PROMPTS[:1], NEW_TOKENS, temperature=0) == [expected]
  assert generate(model, PROMPTS[:1], NEW_TOKENS, temperature=0, stop_tokens=[]) == [greedy]


def test_generate_turns_dropout_off():
  cfg = Gpt2Config(num_hidden_layers=2, vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                   max_position_embeddings=64, dropout=0.5)
  model = Gpt2(cfg, rngs=nnx.Rngs(0))  # in training mode
  tokens = generate(model, PROMPTS, NEW_TOKENS, temperature=0, stop_tokens=[])
  model.eval()
  assert tokens == argmax_recompute(model, PROMPTS, NEW_TOKENS)


def test_filter_logits_top_k_keeps_exactly_the_k_largest():
  logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 2.5, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0, 2.0]])
  kept = np.isfinite(np.asarray(filter_logits(logits, top_k=3)))
  np.testing.assert_array_equal(kept[0], [False, True, False, True, True, False])
  assert kept[1].sum() == 3 and kept[1][5]  # ties: still exactly k, the unique max included
  out = filter_logits(logits, top_k=3)
  np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(logits)[kept])


@pytest.mark.parametrize("top_p, kept", [(0.8, 2), (0.81, 3), (0.5, 1), (0.49, 1), (1.0, 4),
                                         (0.96, 4)])
def test_filter_logits_top_p_keeps_the_minimal_nucleus(top_p, kept):
  probs = np.array([0.15, 0.5, 0.05, 0.3])
  out = np.asarray(filter_logits(jnp.log(jnp.asarray([probs], jnp.float32)), top_p=top_p))[0]
  expected = np.argsort(-probs)[:kept]
  assert set(np.flatnonzero(np.isfinite(out))) == set(expected)


def test_filter_logits_top_p_applies_after_top_k():
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  # Top-2 renormalises to 4/7, 3/7: p = 0.5 needs only the first, p = 0.6 both.
  logits = jnp.log(jnp.asarray([probs], jnp.float32))
  assert np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=0.5))).sum() == 1
  assert np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=0.6))).sum() == 2


@pytest.mark.parametrize("top_k", [None, 2])
def test_sample_frequencies_match_softmax(top_k):
  logits = jnp.asarray([0.0, 1.0, 2.0, 0.5])
  temperature = 0.7
  settings = filters.SamplerSettings(greedy=False, top_k=top_k, use_top_p=False)
  draws = filters.sample_tokens(jnp.broadcast_to(logits, (SAMPLES, 4)), jax.random.key(3),
                                 settings, jnp.float32(temperature), jnp.float32(1.0))
  expected = np.asarray(jax.nn.softmax(filter_logits(logits[None] / temperature, top_k)))[0]
  frequencies = np.bincount(np.asarray(draws), minlength=4) / SAMPLES
  np.testing.assert_allclose(frequencies, expected, atol=0.02)


def sorted_nucleus(logits, top_p):
  """The textbook nucleus in float64 numpy: sort, cumulate, keep while the mass before < p."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-logits, axis=-1)
  sorted_probs = np.take_along_axis(probs, order, -1)
  kept_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
  kept = np.zeros_like(kept_sorted)
  np.put_along_axis(kept, order, kept_sorted, -1)
  return kept


@pytest.mark.parametrize("scale", [3.0, 0.1])  # peaked: nucleus in the top 256; flat: not
def test_nucleus_without_top_k_is_the_sorted_nucleus(scale):
  logits = jax.random.normal(jax.random.key(0), (4, 3000)) * scale
  jitted = jax.jit(filter_logits)  # top_p traced: one compile
  for top_p in (0.1, 0.5, 0.9, 0.999):
    kept = np.isfinite(np.asarray(jitted(logits, top_p=top_p)))
    np.testing.assert_array_equal(kept, sorted_nucleus(logits, top_p), err_msg=f"top_p={top_p}")
    if scale < 1 and top_p >= 0.5:  # flat: the nucleus goes past the candidates
      assert kept.sum(axis=-1).min() > filters.NUCLEUS_CANDIDATES


def test_draw_over_many_blocks_matches_softmax():
  """The two-level draw across padded blocks: right frequencies, never a -inf logit."""
  size = 3 * filters.DRAW_BLOCK + 37  # the last block is mostly padding
  logits = jax.random.normal(jax.random.key(1), (size,)) * 2
  logits = logits.at[::3].set(-jnp.inf)  # filtered tokens, scattered through every block
  draws = np.asarray(filters.draw(jax.random.key(2), jnp.broadcast_to(logits, (SAMPLES, size))))
  assert np.all(np.isfinite(np.asarray(logits)[draws]))
  # Frequencies per group of 100 tokens (each group holds a fair share of the mass).
  groups = np.arange(size) // 100
  expected = np.bincount(groups, weights=np.asarray(jax.nn.softmax(logits)))
  np.testing.assert_allclose(np.bincount(groups[draws], minlength=groups.max() + 1) / SAMPLES,
                             expected, atol=0.02)


@pytest.mark.parametrize("prompts, kwargs, match", [
    ([], {}, "non-empty list"),
    ([[1, 2], []], {}, "prompt 1 must be a non-empty"),
    ([[1, VOCAB]], {}, r"outside \[0, 97\)"),
    ([[-1, 2]], {}, r"outside \[0, 97\)"),
    ([[1.5, 2]], {}, "integer token ids"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"temperature": -0.1}, "temperature"),
    ([[1]], {"top_k": 0}, "top_k"),
    ([[1]], {"top_p": 0.0}, "top_p"),
    ([[1]], {"top_p": 1.5}, "top_p"),
    ([[1]], {"stop_tokens": [VOCAB]}, "stop_tokens"),
    ([[1]], {"stop_tokens": 5}, "stop_tokens must be None or a list"),
    ([[1]], {"stop_tokens": [1.7]}, "stop_tokens must be None or a list"),
    ([[1]], {"max_new_tokens": True}, "max_new_tokens"),
    ([[1]], {"top_k": True}, "top_k"),
])
def test_bad_arguments_raise(gptoss, prompts, kwargs, match):
  kwargs = {"max_new_tokens": 4, **kwargs}
  with pytest.raises(ValueError, match=match):
    generate(gptoss, prompts, **kwargs)


def test_too_long_for_the_model_raises(gpt2, gptoss):
  with pytest.raises(ValueError, match="exceeds the 64 positions"):
    generate(gpt2, [[1] * 60], 5)  # 65 > GPT-2's 64 positions
  limit = gptoss.cfg.initial_context_length  # rope_scaling_factor 1: no YaRN stretch
  with pytest.raises(ValueError, match=f"exceeds the {limit} positions"):
    generate(gptoss, [[1]], limit)


class ByteTokenizer:
  """A stand-in tokenizer: id i is byte i + 32, except ids 0..2 spell the bytes of '你'."""

  SPECIAL = {0: b"\xe4", 1: b"\xbd", 2: b"\xa0"}
  stop_ids = (96,)

  def encode(self, text):
    return [byte - 32 for byte in text.encode()]

  def decode(self, ids):
    pieces = [self.SPECIAL.get(i, bytes([i + 32])) for i in ids]
    return b"".join(pieces).decode("utf-8", errors="replace")


def test_text_stream_never_splits_a_character():
  pieces = []
  stream = text._TextStream(ByteTokenizer(), pieces.append)
  for token in [65, 0, 1, 2, 66, None, 0]:
    stream.add([token])
  stream.finish()
  assert pieces == ["a", "你", "b", "\ufffd"]


def test_generate_text_streams_what_it_returns(gptoss):
  tokenizer = ByteTokenizer()
  prompt = "hello"
  pieces = []
  text = generate_text(gptoss, tokenizer, prompt, NEW_TOKENS, temperature=0, stream=pieces.append)
  tokens = generate(gptoss, [tokenizer.encode(prompt)], NEW_TOKENS, temperature=0,
                    stop_tokens=tokenizer.stop_ids)
  assert text == "".join(pieces) == tokenizer.decode(tokens[0])
  assert generate_text(gptoss, tokenizer, [prompt], NEW_TOKENS, temperature=0) == [text]
