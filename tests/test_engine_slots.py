"""The serving engine's slots are independent: each samples with its own temperature, top-p and
seed whoever joins, and a batched prefill's padding rows never write into a live slot's cache."""

import threading

import jax
import numpy as np
from flax import nnx

from nanogptoss_jax.model import kv_cache
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.serving import prefill
from nanogptoss_jax.serving.engine import CHUNK_TOKENS, Engine, Request
from tests.factories import random_module, tiny_config

CFG = tiny_config(vocab_size=61, initial_context_length=256)
CACHE_LENGTH = 64
MAX_TOKENS = 6 * CHUNK_TOKENS  # long enough for a second request to join mid-way


def _model() -> GptOss:
  # Scanned layers: the engine's caches are then stacks per kind of layer, slots on axis 1.
  return random_module(GptOss, CFG, seed=3, execution=ExecutionConfig(layers_impl="scan"))


def _row(cache, slot: int) -> list[np.ndarray]:
  return [np.take(np.asarray(leaf), slot, axis=kv_cache.batch_axis(cache))
          for leaf in jax.tree.leaves(cache)]


class _Collect:
  """A request's callbacks: the tokens it was handed and an event set when it is done."""

  def __init__(self):
    self.tokens, self.done = [], threading.Event()

  def request(self, prompt, **settings) -> Request:
    return Request(prompt=prompt, max_tokens=MAX_TOKENS, on_tokens=self.tokens.extend,
                   on_done=lambda reason: self.done.set(), **settings)


def _alone(engine, prompt, **settings) -> list[int]:
  out = _Collect()
  engine.submit(out.request(prompt, **settings))
  assert out.done.wait(120)
  return out.tokens


def test_each_slot_samples_with_its_own_settings():
  """A's tokens with B joining mid-way are A's tokens alone, and B's are B's alone; the
  settings matter (A at another temperature draws otherwise), so a slot given its neighbour's
  temperature or top-p would show."""
  engine = Engine(_model(), slots=4, cache_length=CACHE_LENGTH)
  try:
    a = dict(temperature=0.6, top_p=0.8, seed=11)
    b = dict(temperature=1.7, top_p=1.0, seed=12)
    prompt_a, prompt_b = [3, 14, 15, 9, 2], [27, 18, 28]
    alone_a, alone_b = _alone(engine, prompt_a, **a), _alone(engine, prompt_b, **b)
    assert len(alone_a) == len(alone_b) == MAX_TOKENS
    assert _alone(engine, prompt_a, **(a | dict(temperature=1.7, top_p=1.0))) != alone_a

    first, second = _Collect(), _Collect()
    request_a = first.request(prompt_a, **a)
    engine.submit(request_a)
    assert request_a.started.wait(60)
    engine.submit(second.request(prompt_b, **b))  # joins while A decodes
    assert first.done.wait(120) and second.done.wait(120)
    assert first.tokens == alone_a
    assert second.tokens == alone_b
  finally:
    engine.close()


def test_padding_rows_of_a_batched_prefill_never_touch_a_live_slot():
  """Three joiners into 4 slots prefill as a batch of 4 (one padding row). The live slot's cache
  row comes out bit for bit as it went in, whichever slot it is; each joiner's row equals its
  prompt prefilled alone."""
  model = _model()
  graphdef, params = nnx.split(model)
  slots = 4
  prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
  assert prefill.batch_bucket(len(prompts), slots) == 4  # so one row is padding
  for live in range(slots):
    # The live slot holds a prefilled conversation; the other rows start empty.
    cache = prefill.prefill(graphdef, params, model.init_cache(slots, CACHE_LENGTH),
                            [[40, 41, 42, 43, 44, 45]], [live], CACHE_LENGTH)
    before = _row(cache, live)
    joiners = [s for s in range(slots) if s != live]
    cache = prefill.prefill(graphdef, params, cache, prompts, joiners, CACHE_LENGTH)
    for kept, now in zip(before, _row(cache, live)):
      np.testing.assert_array_equal(now, kept)
    for prompt, slot in zip(prompts, joiners):
      single = prefill.prefill(graphdef, params, model.init_cache(slots, CACHE_LENGTH),
                               [prompt], [slot], CACHE_LENGTH)
      for ours, alone in zip(_row(cache, slot), _row(single, slot)):
        np.testing.assert_allclose(ours.astype(np.float32), alone.astype(np.float32),
                                   rtol=1e-5, atol=1e-6)
