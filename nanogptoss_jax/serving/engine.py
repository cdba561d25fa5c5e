"""Continuous batching: a fixed number of slots decode together; requests join between chunks.

Each slot owns one row of the KV cache, its own position, sampler settings and RNG stream
(step t of a request draws with fold_in(key(seed), t)), so a request's tokens do not depend on
its batch mates. One background thread runs the loop: admit waiting requests into free slots
(one batched prefill for all of them, serving/prefill.py, writing each cache row into its
slot), run one jitted chunk of CHUNK_TOKENS decode steps for all slots, hand each request its
tokens, free the slots of requests that finished or were cancelled.
"""

import collections
import dataclasses
import logging
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.parallel.mesh import traced_on
from nanogptoss_jax.sampling.decode import PADDING_POSITION
from nanogptoss_jax.sampling.filters import SamplerSettings, sample_tokens
from nanogptoss_jax.serving import prefill

# Cache positions per slot unless asked (--context): a decode step attends over every slot of a
# full layer's row, so gpt-oss's 131,072 would cost each token ~16x what 8,192 does (and 3 GB
# of bf16 cache per slot for gpt-oss-20b).
DEFAULT_CONTEXT = 8192
CHUNK_TOKENS = 4  # decode steps per jitted call: new requests wait at most this many steps
_SAMPLER = SamplerSettings(greedy=False, top_k=None, use_top_p=True)


class QueueFull(UserError):
  """More requests wait than the queue holds."""


@dataclasses.dataclass(eq=False)
class Request:
  """One completion: prompt ids in, tokens out through `on_tokens(list)` / `on_done(reason)`.

  Both callbacks run on the engine thread. `cancel()` frees the slot at the next chunk.
  """

  prompt: list[int]
  max_tokens: int
  on_tokens: Callable[[list[int]], None]
  on_done: Callable[[str], None]
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int | None = None
  stop_ids: tuple[int, ...] = ()
  generated: int = 0
  started: threading.Event = dataclasses.field(default_factory=threading.Event)
  cancelled: bool = False

  def cancel(self) -> None:
    self.cancelled = True


def _decode_chunk(graphdef, params, cache, token, position, active, keys, steps, temperature,
                  top_p):
  """CHUNK_TOKENS steps for every slot -> (cache, tokens [B, CHUNK_TOKENS])."""
  model = nnx.merge(graphdef, params)
  model.eval()

  def step(carry, t):
    cache, token, position = carry
    where = jnp.where(active, position, PADDING_POSITION)  # idle slots store nothing
    logits = model.forward(token[:, None], where[:, None], cache)
    row_keys = jax.vmap(jax.random.fold_in)(keys, steps + t)
    drawn = jax.vmap(lambda lg, k, temp, p: sample_tokens(lg[None], k, _SAMPLER, temp, p)[0])(
        logits.logits[:, 0], row_keys, temperature, top_p)
    drawn = jnp.where(temperature == 0, jnp.argmax(logits.logits[:, 0], -1), drawn)
    drawn = drawn.astype(jnp.int32)
    return (logits.cache, drawn, position + 1), drawn

  (cache, token, position), drawn = jax.lax.scan(step, (cache, token, position),
                                                 jnp.arange(CHUNK_TOKENS))
  return cache, token, position, drawn.T


_decode_jit = jax.jit(_decode_chunk, static_argnums=0, donate_argnums=2)


class Engine:
  """Serves Requests from `slots` decode slots and a queue of at most `max_queue` waiting."""

  def __init__(self, model, *, slots: int = 4, cache_length: int | None = None,
               max_queue: int = 64):
    self.graphdef, self.params = nnx.split(model)
    self.cfg = model.cfg
    self.slots = slots
    self.cache_length = min(cache_length or DEFAULT_CONTEXT, self.cfg.max_positions)
    self.max_queue = max_queue
    self.cache = model.init_cache(slots, self.cache_length)
    self.token = np.zeros(slots, np.int32)
    self.position = np.zeros(slots, np.int32)
    self.keys = np.array(jax.random.key_data(jax.vmap(jax.random.key)(np.arange(slots))))
    self.temperature = np.ones(slots, np.float32)
    self.top_p = np.ones(slots, np.float32)
    self.running: list[Request | None] = [None] * slots
    self.waiting: collections.deque[Request] = collections.deque()
    self.counters = collections.Counter()
    self._lock = threading.Condition()
    self._stop = False
    self._seed_counter = 0
    self._warm: list[tuple[tuple[int, ...], threading.Event]] = []  # warm_up calls to run
    self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
    self._thread.start()

  def check(self, prompt_length: int, max_tokens: int) -> None:
    """UserError when a request cannot fit in a slot's cache row."""
    if prompt_length < 1:
      raise UserError("the prompt is empty")
    if prompt_length + max_tokens > self.cache_length:
      raise UserError(f"prompt ({prompt_length} tokens) + max_tokens ({max_tokens}) exceeds "
                      f"the context of {self.cache_length} tokens (serve.py --context, at most "
                      f"the model's {self.cfg.max_positions})")

  def submit(self, request: Request) -> None:
    self.check(len(request.prompt), request.max_tokens)
    with self._lock:
      if self._stop:
        raise UserError("the engine has stopped (see the server log)")
      if len(self.waiting) >= self.max_queue:
        self.counters["rejected"] += 1
        raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
      self.waiting.append(request)
      self.counters["requests"] += 1
      self._lock.notify()

  def busy_slots(self) -> int:
    return sum(r is not None for r in self.running)

  def warm_up(self, *prompt_lengths: int) -> None:
    """Compiles the decode chunk and, for each length's prompt bucket, the prefill of every
    batch bucket (prefill.py), on the engine thread between chunks; returns when done.

    Serving then compiles nothing for prompts of those buckets: a first burst of joiners would
    otherwise wait seconds for XLA. The lengths are token counts (e.g. a typical prompt's).
    """
    done = threading.Event()
    with self._lock:
      if self._stop:
        return
      self._warm.append((prompt_lengths, done))
      self._lock.notify()
    done.wait()

  def close(self) -> None:
    with self._lock:
      self._stop = True
      self._lock.notify()
    self._thread.join(timeout=30)

  def _admit(self, admit: list[tuple[int, Request]]) -> None:
    """Prefills the joiners together, then gives each its slot's position, sampler and key."""
    self.cache = prefill.prefill(self.graphdef, self.params, self.cache,
                                 [r.prompt for _, r in admit], [s for s, _ in admit],
                                 self.cache_length)
    for slot, request in admit:
      seed = request.seed
      if seed is None:  # unseeded requests still get distinct streams
        self._seed_counter += 1
        seed = hash((id(self), self._seed_counter)) & 0x7FFFFFFF
      self.keys[slot] = np.asarray(jax.random.key_data(jax.random.key(seed)))
      self.token[slot], self.position[slot] = request.prompt[-1], len(request.prompt) - 1
      self.temperature[slot], self.top_p[slot] = request.temperature, request.top_p
      self.running[slot] = request
      request.started.set()

  def _finish(self, slot: int, reason: str) -> None:
    request, self.running[slot] = self.running[slot], None
    request.on_done(reason)

  def _loop(self) -> None:
    try:
      # Every program of the engine is traced under the model's mesh (its experts and heads
      # stay where they lie, model/expert_parallel.py); the mesh context is this thread's.
      with traced_on(self.params):
        self._serve()
      self._release_warm_ups()
    except Exception:  # noqa: BLE001 - no request may wait forever on a dead engine
      logging.exception("the engine stopped")
      with self._lock:
        self._stop = True
      for slot, request in enumerate(self.running):
        if request is not None:
          self._finish(slot, "error")
      while self.waiting:
        self.waiting.popleft().on_done("error")
      self._release_warm_ups()

  def _release_warm_ups(self) -> None:
    with self._lock:
      warm, self._warm = self._warm, []
    for _, done in warm:
      done.set()

  def _run_warm_ups(self, warm) -> None:
    try:
      for prompt_lengths, _ in warm:
        for length in prompt_lengths:
          self.cache = prefill.warm_up(self.graphdef, self.params, self.cache, length,
                                       self.cache_length)
        idle = np.zeros(self.slots, bool)  # every slot idle: the chunk stores nothing
        self.cache = _decode_jit(self.graphdef, self.params, self.cache, self.token,
                                 self.position, idle, jax.random.wrap_key_data(self.keys),
                                 np.zeros(self.slots, np.int32), self.temperature,
                                 self.top_p)[0]
    finally:  # an engine that fails here still lets every caller go
      for _, done in warm:
        done.set()

  def _serve(self) -> None:
    while True:
      with self._lock:
        while (not self._stop and not self.waiting and not self._warm
               and self.busy_slots() == 0):
          self._lock.wait()
        if self._stop:
          return
        warm, self._warm = self._warm, []
        admit = []
        for slot in range(self.slots):
          if self.running[slot] is None and self.waiting:
            admit.append((slot, self.waiting.popleft()))
      self._run_warm_ups(warm)
      joining = []
      for slot, request in admit:
        if request.cancelled:
          request.on_done("cancelled")
        else:
          joining.append((slot, request))
      if joining:
        self._admit(joining)
      self._step()

  def _step(self) -> None:
    for slot, request in enumerate(self.running):
      if request is not None and request.cancelled:
        self._finish(slot, "cancelled")
    active = np.array([r is not None for r in self.running])
    if not active.any():
      return
    steps = np.array([r.generated if r else 0 for r in self.running], np.int32)
    self.cache, token, position, drawn = _decode_jit(
        self.graphdef, self.params, self.cache, self.token, self.position, active,
        jax.random.wrap_key_data(self.keys), steps, self.temperature, self.top_p)
    self.token, self.position = np.array(token), np.array(position)
    drawn = np.asarray(drawn)
    for slot, request in enumerate(self.running):
      if request is None:
        continue
      tokens, reason = [], None
      for t in drawn[slot].tolist():
        if t in request.stop_ids:
          reason = "stop"
          break
        tokens.append(t)
        if request.generated + len(tokens) >= request.max_tokens:
          reason = "length"
          break
      request.generated += CHUNK_TOKENS
      self.counters["tokens"] += len(tokens)
      if tokens:
        request.on_tokens(tokens)
      if reason is not None:
        self._finish(slot, reason)
