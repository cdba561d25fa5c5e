"""Rotary position embedding with YaRN scaling (NTK-by-parts + attention concentration)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from nanogptoss_jax.model.config import GptOssConfig, yarn_bounds

# YaRN's concentration: logits are sharpened by this factor of ln(scaling_factor) so attention
# entropy stays put when the context is stretched (YaRN paper, eq. for sqrt(1/t)).
YARN_CONCENTRATION_SLOPE = 0.1


def yarn_frequencies(cfg: GptOssConfig) -> tuple[float, np.ndarray]:
  """(concentration, inv_freq [H/2]) exactly as the reference computes them, in float32."""
  freq = cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim)
  if cfg.rope_scaling_factor <= 1.0:
    return 1.0, (1.0 / freq).astype(np.float32)
  concentration = YARN_CONCENTRATION_SLOPE * math.log(cfg.rope_scaling_factor) + 1.0
  # NTK-by-parts: high-frequency pairs (index < low) keep their frequency (extrapolation),
  # low-frequency pairs (index > high) are divided by the scaling factor (interpolation), and a
  # linear ramp blends the two in between.
  low, high = yarn_bounds(cfg)
  interpolation = 1.0 / (cfg.rope_scaling_factor * freq)
  extrapolation = 1.0 / freq
  ramp = (np.arange(cfg.head_dim // 2, dtype=np.float32) - low) / (high - low)
  keep = 1.0 - np.clip(ramp, 0.0, 1.0)
  inv_freq = interpolation * (1.0 - keep) + extrapolation * keep
  return concentration, inv_freq.astype(np.float32)


def _tables(cfg: GptOssConfig, positions, xp):
  """cos and sin [B, T, H/2] of integer positions [B, T] with numpy or jax.numpy (`xp`)."""
  concentration, inv_freq = yarn_frequencies(cfg)
  angles = positions.astype(xp.float32)[..., None] * inv_freq  # [B, T, H/2]
  return xp.cos(angles) * concentration, xp.sin(angles) * concentration


def rope_tables(cfg: GptOssConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos and sin [B, T, H/2] for integer positions [B, T], concentration folded in."""
  return _tables(cfg, positions, jnp)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the two halves of the last axis of x [B, T, ..., H] (the reference's layout)."""
  extra = x.ndim - cos.ndim  # head axes between T and H
  cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:]).astype(x.dtype)
  sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:]).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def rope_tables_in_order(cfg: GptOssConfig, length: int) -> tuple[jax.Array, jax.Array]:
  """cos and sin [1, T, H/2] for positions 0..T-1, as constants computed with numpy.

  Traced tables from an iota get fused into every consumer, and XLA on CPU then calls sin and
  cos once per element of each RoPE gradient it writes (nano: 1M calls per layer, per step).
  Constants are read instead, with identical losses.
  """
  cos, sin = _tables(cfg, np.arange(length)[None], np)
  return jnp.asarray(cos), jnp.asarray(sin)
