"""Flash attention (kernels/flash_attention.py) equals the plain `attention` of model/: values
and every gradient (q, k, v, sinks) on shapes drawn at random, with windows of 1, 128 and
longer than the sequence, GQA groups of 1 to 8 and lengths that are no multiple of a block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogptoss_jax.kernels.flash_attention import flash_attention
from nanogptoss_jax.model import choices
from nanogptoss_jax.model.attention import attention, visible
from tests.factories import normal, relative_error

TOLERANCE = 1e-5
BLOCKS = dict(query_block=32, key_block=16)  # small blocks: many of them at small T




def _draw(seed, window_kind, groups):
  """A random shape: batch, kv heads, head dim, length, and whether sinks / keys in order."""
  rng = np.random.default_rng(seed)
  length = int(rng.integers(33, 190))
  window = {"none": None, "1": 1, "128": 128, "long": length + int(rng.integers(0, 50))}
  return dict(batch=int(rng.integers(1, 3)), kv_heads=int(rng.integers(1, 3)), groups=groups,
              head_dim=int(rng.choice([4, 8, 16])), length=length, window=window[window_kind],
              # Without a sink a window of 1 makes every dq exactly 0 (each softmax has one
              # entry), which no relative error can measure: window 1 always has its sink.
              # No window is GPT-2's case: no sink either.
              sinks=window_kind == "1" or (window_kind != "none" and bool(rng.integers(0, 4))),
              in_order=bool(rng.integers(0, 3)))


CASES = [(11, "none", 1), (12, "1", 2), (13, "128", 3), (14, "long", 4), (15, "128", 5),
         (16, "1", 6), (17, "long", 7), (18, "128", 8)]


def _inputs(shape, dtype=jnp.float32):
  b, t, kh, g, h = (shape[n] for n in ("batch", "length", "kv_heads", "groups", "head_dim"))
  q = normal((b, t, kh, g, h), 0, dtype)
  k, v = normal((2, b, kh, t, h), 1, dtype)
  sinks = normal((kh, g), 2) if shape["sinks"] else None
  positions = jnp.broadcast_to(jnp.arange(t), (b, t))
  return q, k, v, sinks, positions, normal(q.shape, 3)


def _grads(fn, shape, dtype=jnp.float32):
  """(output, (dq, dk, dv[, dsink])) of sum(fn(...) * upstream)."""
  q, k, v, sinks, positions, upstream = _inputs(shape, dtype)

  def loss(q, k, v, sinks):
    out = fn(q, k, v, positions, positions, window=shape["window"], sinks=sinks)
    return jnp.sum(out.astype(jnp.float32) * upstream), out

  argnums = (0, 1, 2, 3) if shape["sinks"] else (0, 1, 2)
  grads, out = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, sinks)
  return out, grads


def _flash(shape):
  return lambda *args, **kw: flash_attention(*args, **kw, visible=visible,
                                             in_order=shape["in_order"], **BLOCKS)


def assert_equals_plain(kernel, shape):
  """`kernel` equals the plain attention in its output and every gradient (q, k, v, sinks)."""
  out, grads = _grads(kernel, shape)
  plain_out, plain_grads = _grads(attention, shape)
  for name, ours, theirs in zip(("output", "dq", "dk", "dv", "dsink"),
                                (out,) + tuple(grads), (plain_out,) + tuple(plain_grads)):
    err = relative_error(ours, theirs)
    assert err <= TOLERANCE, f"{name} {shape}: relative error {err:.2e}"


@pytest.mark.parametrize("seed, window_kind, groups", CASES)
def test_flash_equals_plain_attention(seed, window_kind, groups):
  shape = _draw(seed, window_kind, groups)
  assert_equals_plain(_flash(shape), shape)


def test_flash_in_bfloat16_is_no_further_from_float32_than_plain():
  shape = dict(batch=1, kv_heads=2, groups=3, head_dim=16, length=77, window=128, sinks=True,
               in_order=True)
  reference = _grads(attention, shape)
  flash, plain = _grads(_flash(shape), shape, jnp.bfloat16), _grads(attention, shape, jnp.bfloat16)
  for name, ref, ours, theirs in zip(("output", "dq", "dk", "dv", "dsink"),
                                     (reference[0],) + reference[1], (flash[0],) + flash[1],
                                     (plain[0],) + plain[1]):
    ours_err, plain_err = relative_error(ours, ref), relative_error(theirs, ref)
    # bf16 rounding of the same products in another order: allow a quarter more than plain's.
    assert ours_err <= 1.25 * plain_err + 1e-3, f"{name}: {ours_err:.2e} vs plain {plain_err:.2e}"


def decode_case():
  """(q, k, v, q_pos, k_pos, sinks) of a decode step: one query per row at its own position
  over cached keys with gaps (-1)."""
  q = normal((2, 1, 1, 4, 8), 0)
  k, v = normal((2, 2, 1, 40, 8), 1)
  k_pos = jnp.where(jnp.arange(40) < 30, jnp.arange(40), -1)[None].repeat(2, 0)
  q_pos = jnp.asarray([[29], [12]])
  sinks = normal((1, 4), 2)
  return q, k, v, q_pos, k_pos, sinks


def test_flash_over_a_cache_with_unknown_positions():
  """Decode-like: one query per row at its own position over keys with gaps (-1)."""
  q, k, v, q_pos, k_pos, sinks = decode_case()
  for window in (None, 5):
    ours = flash_attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible,
                           **BLOCKS)
    theirs = attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks)
    assert relative_error(ours, theirs) <= TOLERANCE


def test_auto_picks_flash_when_the_probabilities_grow_large():
  assert choices.attention_impl("auto", 256, 256) == "blocked"
  assert choices.attention_impl("auto", 4096, 4096) == "flash"
  assert choices.attention_impl("blocked", 4096, 4096) == "blocked"
