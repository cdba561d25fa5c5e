"""Attention with learned sinks by JAX's TPU splash kernel (twin: `model.attention.attention`).

`jax.experimental.pallas.ops.tpu.splash_attention` is a Mosaic (TPU) Pallas kernel with its own
custom VJP; it takes one sink logit per query head and folds it into the softmax as a column
with no value, as the plain attention does, and it skips the key blocks its mask hides. What
this wrapper adds: the layout (per batch row, query heads n = k * G + g over kv heads k, which
is splash's GQA rule h // G), the 1 / sqrt(H) scale (splash scores are the bare q . k, so q is
scaled first), masks built from the window (`CausalMask`, or `LocalMask` reaching `window - 1`
keys back so a query sees `window` keys, itself included), and padding T to whole blocks.

Splash masks are static index patterns, so it serves only the training case: keys are the
queries' own tokens at positions 0..T-1 (`in_order`). Anything else (prefill or decode over a
cache, positions with gaps) falls back to `kernels.flash_attention`, whose mask reads positions.

Off the TPU the kernel runs in Pallas' interpret mode (tests/test_splash_attention.py compares it
with the plain attention on the CPU). On a TPU, the same test with `interpret=False` (the default
there) checks the compiled kernel: `python -m pytest tests/test_splash_attention.py -q`.
"""

import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from nanogptoss_jax.kernels.flash_attention import flash_attention


def _splash():
  # Imported on first use: the model imports this module on every backend, and a JAX build
  # (another version, another platform) whose TPU kernels fail to import must still run.
  return importlib.import_module("jax.experimental.pallas.ops.tpu.splash_attention")

# Splash wants key blocks in multiples of the TPU's 128 lanes; T is padded to a multiple of
# this and the largest of BLOCKS that divides it is used (bigger blocks run faster on a TPU).
LANES = 128
BLOCKS = (512, 256, 128)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array,
                     k_pos: jax.Array, *, window: int | None, sinks: jax.Array | None,
                     visible: Callable, in_order: bool = False, block: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Grouped-query attention: q [B, T, K, G, H], k/v [B, K, S, H] -> [B, T, K, G, H].

  Same contract as `kernels.flash_attention.flash_attention`; without `in_order` (or when
  S != T) it is that function. `interpret` defaults to True off the TPU (slow, for tests).
  """
  batch, length, kv_heads, groups, head_dim = q.shape
  if not in_order or k.shape[2] != length:
    return flash_attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible,
                           in_order=in_order)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  padded, block = padded_length(length, block)
  kernel = splash_kernel(padded, kv_heads * groups, window, block, interpret)
  # Zero rows past T: causal masks keep real queries off the padded keys, and padded queries
  # get a zero upstream gradient, so they add nothing to dk, dv or the sinks' gradient.
  pad = [(0, 0)] * 3 + [(0, padded - length), (0, 0)]
  rows = jnp.pad(q.transpose(0, 2, 3, 1, 4), pad)  # [B, K, G, Tp, H]
  rows = rows.reshape(batch, kv_heads * groups, padded, head_dim)  # [B, N, Tp, H]
  rows = rows * head_dim ** -0.5  # splash scores are the bare q . k
  k, v = (jnp.pad(x, pad[1:]) for x in (k, v))  # [B, K, Tp, H]
  head_sinks = None if sinks is None else sinks.reshape(kv_heads * groups).astype(jnp.float32)
  out = jax.vmap(lambda q, k, v: kernel(q, k, v, sinks=head_sinks))(rows, k, v)  # [B, N, Tp, H]
  out = out[:, :, :length].reshape(batch, kv_heads, groups, length, head_dim)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).astype(v.dtype)  # [B, T, K, G, H]


def padded_length(length: int, block: int | None = None) -> tuple[int, int]:
  """(T padded to whole blocks, the block): `block` if given, else the largest of BLOCKS."""
  padded = -(-length // LANES) * LANES
  if block is None:
    block = next(size for size in BLOCKS if padded % size == 0)
  if block % LANES:
    raise ValueError(f"splash blocks must be multiples of {LANES}, got {block}")
  return -(-length // block) * block, block


def window_mask(length: int, window: int | None):
  """One head's [T, T] splash mask: causal, and `window` keys back with the query itself
  included."""
  splash = _splash()
  if window is None:
    return splash.CausalMask((length, length))
  return splash.LocalMask((length, length), window_size=(window - 1, 0), offset=0)


@functools.lru_cache(maxsize=64)
def splash_kernel(length: int, heads: int, window: int | None, block: int, interpret: bool):
  """The splash kernel for [heads, length, H] queries; built once per shape (its mask
  bookkeeping is numpy work at trace time) and kept out of any trace, so nothing cached leaks
  a tracer."""
  splash = _splash()
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([window_mask(length, window)] * heads)
  with jax.ensure_compile_time_eval():
    return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
