"""Weight-only int8: a frozen matrix stored as int8 with one float32 scale per output channel.

w ≈ q * s, q = round(w / s) in [-127, 127], s = max |w| / 127 over each output channel (each
column of a kernel [in, out], each row of the embedding table [V, D]). Products run in the
compute dtype on the int8 values converted there, and the scale multiplies the output:
x (q s) = (x q) s. `ExecutionConfig.dense_format="int8"` stores the token embedding and
attention's qkv and output kernels this way (model/quantize.py converts a float model); they
cannot train, which LoRA does not need: its adapters stay float and add their update on top.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nanogptoss_jax.model import axes, choices

LEVELS = 127  # symmetric: -127..127, so the grid has a zero and no lopsided end


def quantize(weights: jax.Array, reduce_axis: int) -> tuple[jax.Array, jax.Array]:
  """(int8 values, float32 scales) of `weights`, one scale per slice along `reduce_axis` (the
  input axis: each output channel, and each layer of a stack, gets its own); an all-zero
  channel gets scale 1 and zeros."""
  w = weights.astype(jnp.float32)
  peak = jnp.max(jnp.abs(w), axis=reduce_axis, keepdims=True)
  scale = jnp.where(peak > 0, peak / LEVELS, 1.0)
  values = jnp.clip(jnp.round(w / scale), -LEVELS, LEVELS).astype(jnp.int8)
  return values, jnp.squeeze(scale, reduce_axis)


def dequantize(values: jax.Array, scales: jax.Array, reduce_axis: int,
               dtype=jnp.float32) -> jax.Array:
  """values * scales, the scales repeated along `reduce_axis`, in `dtype`."""
  return (values.astype(jnp.float32) * jnp.expand_dims(scales, reduce_axis)).astype(dtype)


# Each int8 matrix's name, its scales' name and the axis a scale spans (the input axis).
STORAGE = {"kernel": ("kernel_scale", -2), "embedding": ("scale", -1)}


class Int8Linear(nnx.Module):
  """y = (x · q) s + b: `nnx.Linear`'s product (kernel [in, out], bias [out]) with the kernel
  held as int8 values `kernel` and float32 per-column scales `kernel_scale`."""

  def __init__(self, in_features: int, out_features: int, *, logical_axes: tuple[str, str],
               dtype, param_dtype, use_bias: bool = True):
    self.dtype = dtype
    # Zeros: a loader or model/quantize.py fills them.
    self.kernel = nnx.Param(jnp.zeros((in_features, out_features), jnp.int8),
                            **axes.names(*logical_axes))
    self.kernel_scale = nnx.Param(jnp.ones((out_features,), jnp.float32),
                                  **axes.names(logical_axes[1]))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype),
                           **axes.names(logical_axes[1])) if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype))
    # Named as nnx.Linear's product (layers.linear) for the `matmuls` remat policy.
    y = checkpoint_name(y, choices.MATMUL_OUTPUT) * self.kernel_scale[...].astype(self.dtype)
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class Int8Embed(nnx.Module):
  """Token ids -> rows of an embedding table [V, D] held as int8 values and a float32 scale
  per token (row)."""

  def __init__(self, num_embeddings: int, features: int, *, dtype):
    self.dtype = dtype
    self.embedding = nnx.Param(jnp.zeros((num_embeddings, features), jnp.int8),
                               **axes.names(axes.VOCAB, axes.EMBED))
    self.scale = nnx.Param(jnp.ones((num_embeddings,), jnp.float32), **axes.names(axes.VOCAB))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    rows = self.embedding[...][tokens].astype(jnp.float32)  # [.., D]
    return (rows * self.scale[...][tokens][..., None]).astype(self.dtype)
