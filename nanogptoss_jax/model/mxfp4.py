"""MXFP4 expert weights, the readable math: 4-bit e2m1 values times a shared power of two.

A checkpoint stores each expert matrix [E, out, in] as `blocks` uint8 [E, out, in/32, 16] (two
e2m1 codes a byte, the low nibble first) and `scales` uint8 [E, out, in/32] (one biased
exponent per 32 values). The fast twin is `kernels/mxfp4.py`; `model/choices.py` picks.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

# The 16 e2m1 codes: sign bit, two exponent bits, one mantissa bit (OpenAI's FP4_VALUES).
FP4_VALUES = (+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
              -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
VALUES_PER_BLOCK = 32  # one scale each
BYTES_PER_BLOCK = 16
SCALE_BIAS = 127


def unpack_nibbles(blocks: jax.Array) -> jax.Array:
  """uint8 [..., G, 16] -> codes [..., G, 32], low nibble first (the even element)."""
  pairs = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., G, 16, 2]
  return pairs.reshape(*blocks.shape[:-1], VALUES_PER_BLOCK)


def decode(blocks: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
  """blocks [..., G, 16], scales [..., G] -> values [..., G * 32] in dtype: LUT x 2^(scale-127).

  Every value is exact in bfloat16 and float32 for scales in [1, 254] (<= 2 mantissa bits).
  """
  values = jnp.asarray(FP4_VALUES, jnp.float32)[unpack_nibbles(blocks)]  # [..., G, 32]
  exponent = scales.astype(jnp.int32) - SCALE_BIAS
  values = jnp.ldexp(values, exponent[..., None])
  return values.reshape(*scales.shape[:-1], -1).astype(dtype)


def decode_numpy(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """The same on the host (loading with `dequantize`), float32, one tensor at a time."""
  codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
  values = np.asarray(FP4_VALUES, np.float32)[codes]
  values = np.ldexp(values, scales.astype(np.int32)[..., None] - SCALE_BIAS)
  return values.reshape(*scales.shape[:-1], -1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mxfp4Experts:
  """A stack of expert matrices [E, in, out] held as MXFP4 ([E, out, in/32, 16] + scales).

  Indexing with expert ids decodes those experts only: `w[e]` -> [len(e), in, out] in dtype.
  """

  blocks: jax.Array
  scales: jax.Array
  decode: Callable = dataclasses.field(metadata=dict(static=True))
  dtype: object = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int, int]:
    experts, out, groups, _ = self.blocks.shape
    return experts, groups * VALUES_PER_BLOCK, out

  def __getitem__(self, experts) -> jax.Array:
    # Decoded [.., out, in]; the swap is folded into the following dot by XLA.
    return jnp.swapaxes(self.decode(self.blocks[experts], self.scales[experts], self.dtype), -1, -2)

  def dequantize(self) -> jax.Array:
    """Every expert, [E, in, out]."""
    return jnp.swapaxes(self.decode(self.blocks, self.scales, self.dtype), -1, -2)
