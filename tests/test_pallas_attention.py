"""The Pallas attention kernel (kernels/pallas_attention.py) equals the plain `attention` of
model/: values and every gradient (q, k, v, sinks), in Pallas' interpret mode on the CPU
(compiled for the GPU by benchmarks/gpu_check.sh). Windows 1, 128 and longer than the
sequence, GQA groups 1 to 8, lengths that are no multiple of a block, keys in order or not."""

import jax
import pytest

from nanogptoss_jax.kernels.pallas_attention import pallas_attention
from nanogptoss_jax.model import choices
from nanogptoss_jax.model.attention import attention, visible
from tests.factories import relative_error
from tests.test_flash_attention import TOLERANCE, assert_equals_plain, decode_case

BLOCKS = dict(row_block=16, key_block=16)  # Triton's smallest dot: many blocks at small T

# (batch, kv heads, groups, head dim, length, window, sinks, keys in order): interpret mode
# runs each grid step in Python, so the shapes are small but still span several blocks.
CASES = [(1, 1, 1, 8, 37, None, False, True), (1, 2, 2, 4, 21, 1, True, True),
         (2, 1, 3, 16, 45, 12, True, True), (1, 1, 4, 8, 29, 40, True, True),
         (1, 1, 5, 8, 19, 7, True, True), (1, 2, 6, 4, 13, 1, True, False),
         (1, 1, 7, 8, 17, 30, False, True), (1, 1, 8, 16, 23, 128, True, False)]


def _shape(case):
  names = ("batch", "kv_heads", "groups", "head_dim", "length", "window", "sinks", "in_order")
  return dict(zip(names, case))


def _pallas(shape):
  return lambda *args, **kw: pallas_attention(*args, **kw, visible=visible,
                                              in_order=shape["in_order"], **BLOCKS)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[2]}-T{c[4]}-w{c[5]}")
def test_pallas_equals_plain_attention(case):
  shape = _shape(case)
  assert_equals_plain(_pallas(shape), shape)


def test_pallas_over_a_cache_with_unknown_positions():
  """Decode-like: one query per row at its own position over keys with gaps (-1)."""
  q, k, v, q_pos, k_pos, sinks = decode_case()
  for window in (None, 5):
    ours = jax.jit(lambda q, k, v: pallas_attention(
        q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible, **BLOCKS))(q, k, v)
    theirs = attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks)
    assert relative_error(ours, theirs) <= TOLERANCE


def test_auto_keeps_pallas_off_until_timed_on_a_gpu(monkeypatch):
  """`auto` never picks the Pallas kernel (not yet timed on a GPU); naming it picks it, and
  the target platform comes from the execution config or, with "auto", the backend."""
  monkeypatch.setattr(choices.jax, "default_backend", lambda: "gpu")
  assert choices.attention_impl("auto", 256, 256) == "blocked"
  assert choices.attention_impl("auto", 4096, 4096) == "flash"
  assert choices.attention_impl("pallas", 256, 256) == "pallas"
  monkeypatch.setattr(choices.jax, "default_backend", lambda: "cpu")
  assert choices.attention_impl("auto", 256, 256, in_order=True, platform="tpu") == "splash"
  assert choices.attention_impl("auto", 256, 256, in_order=True, platform="gpu") == "blocked"
