"""The splash attention wrapper (kernels/splash_attention.py) equals the plain `attention` of
model/: values and every gradient (q, k, v, sinks), with JAX's TPU splash kernel in Pallas'
interpret mode on the CPU (compiled on a TPU). Windows 1, 12 and longer than the sequence, GQA
groups 1 to 4, lengths that are no multiple of the 128-wide block; off the training case
(keys not the queries in order) the wrapper is flash attention."""

import jax.numpy as jnp
import numpy as np
import pytest

from nanogptoss_jax.kernels.splash_attention import padded_length, splash_attention, window_mask
from nanogptoss_jax.model import choices
from nanogptoss_jax.model.attention import attend, attention, visible
from tests.factories import relative_error
from tests.test_flash_attention import TOLERANCE, assert_equals_plain, decode_case

# (batch, kv heads, groups, head dim, length, window, sinks): interpret mode compiles each
# kernel for the CPU, so the shapes are small; T = 150 spans two key blocks of 128.
CASES = [(1, 1, 1, 8, 37, None, False), (1, 2, 2, 4, 21, 1, True),
         (2, 1, 3, 16, 150, 12, True), (1, 1, 4, 8, 29, 40, True)]


def _shape(case):
  names = ("batch", "kv_heads", "groups", "head_dim", "length", "window", "sinks")
  return dict(zip(names, case), in_order=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"G{c[2]}-T{c[4]}-w{c[5]}")
def test_splash_equals_plain_attention(case):
  kernel = lambda *args, **kw: splash_attention(*args, **kw, visible=visible, in_order=True,
                                                block=128)  # interpret mode off the TPU
  assert_equals_plain(kernel, _shape(case))


@pytest.mark.parametrize("window", [None, 1, 5, 300])
def test_splash_masks_are_the_models_visibility_rule(window):
  positions = jnp.arange(200)[None]
  ours = window_mask(200, window)[:, :]
  assert np.array_equal(ours, np.asarray(visible(positions, positions, window)[0]))


def test_lengths_are_padded_to_whole_blocks():
  assert padded_length(37) == (128, 128)
  assert padded_length(600) == (640, 128)
  assert padded_length(1000) == (1024, 512)
  assert padded_length(150, 128) == (256, 128)
  with pytest.raises(ValueError, match="multiples of 128"):
    padded_length(64, 64)


def test_splash_off_the_training_case_is_flash_attention():
  """Decode-like: one query per row at its own position over keys with gaps (-1)."""
  q, k, v, q_pos, k_pos, sinks = decode_case()
  for window in (None, 5):
    ours = attend(q, k, v, q_pos, k_pos, window=window, sinks=sinks, impl="splash")
    theirs = attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks)
    assert relative_error(ours, theirs) <= TOLERANCE


def test_auto_picks_splash_on_the_tpu_for_training_only(monkeypatch):
  monkeypatch.setattr(choices.jax, "default_backend", lambda: "tpu")
  assert choices.attention_impl("auto", 256, 256, in_order=True) == "splash"
  assert choices.attention_impl("auto", 1, 256, in_order=False) == "blocked"  # decode
  assert choices.attention_impl("flash", 256, 256, in_order=True) == "flash"
  monkeypatch.setattr(choices.jax, "default_backend", lambda: "cpu")
  assert choices.attention_impl("auto", 256, 256, in_order=True) == "blocked"
  assert choices.attention_impl("auto", 4096, 4096, in_order=True) == "flash"
