"""MXFP4 expert weights, the readable math: 4-bit e2m1 values times a shared power of two.

A checkpoint stores each expert matrix [E, out, in] as `blocks` uint8 [E, out, in/32, 16] (two
e2m1 codes a byte, the low nibble first) and `scales` uint8 [E, out, in/32] (one biased
exponent per 32 values). The fast twin is `kernels/mxfp4.py`; `model/choices.py` picks.
`quantize` is the inverse: float weights to the nearest blocks and scales.
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
FP4_MAX = 6.0  # the largest e2m1 magnitude
# Halfway points between neighbouring e2m1 magnitudes (codes c and c + 1, c = 0..6).
FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
FLOAT32_EXPONENT_BITS = 0x7F800000
FLOAT32_MANTISSA_BITS = 0x007FFFFF


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


@jax.jit
def quantize(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """values [..., G * 32] float -> (blocks uint8 [..., G, 16], scales uint8 [..., G]).

  OpenAI's own quantizer (`gpt_oss.triton.moe.quantize_mx4`, and transformers'
  `quantize_to_mxfp4`) is triton_kernels' `downcast_to_mxfp` with its default scale rule,
  `DequantScaleRoundingMode.ROUND_UP`, followed here bit for bit: a block's scale is the
  smallest power of two >= max|x| / 6, so no value clips (the OCP spec's rule, ROUND_DOWN,
  clips the top value about half the time); each x / scale then rounds to the nearest e2m1
  value, ties to the even code. An all-zero block gets scale byte 0. The reference casts its
  input to bfloat16 first; float32 weights here round once, so bfloat16 ones give its codes.
  """
  if weights.shape[-1] % VALUES_PER_BLOCK:
    raise ValueError(f"MXFP4 quantizes blocks of {VALUES_PER_BLOCK} values along the last axis;"
                     f" its length {weights.shape[-1]} is not a multiple")
  x = weights.astype(jnp.float32).reshape(*weights.shape[:-1], -1, VALUES_PER_BLOCK)  # [..., G, 32]
  # Round max|x| / 6 up to a power of two on its bits: any mantissa carries into the exponent.
  ideal = jax.lax.bitcast_convert_type(jnp.max(jnp.abs(x), axis=-1) / FP4_MAX, jnp.uint32)
  scale_bits = (ideal + FLOAT32_MANTISSA_BITS) & FLOAT32_EXPONENT_BITS  # [..., G]
  scale = jax.lax.bitcast_convert_type(scale_bits, jnp.float32)
  # The reciprocal of a power of two is exact (scales stay <= 2^126 for finite float32), and
  # multiplying by 0 keeps the sign of a zero block's -0.0 entries.
  inverse = jnp.where(scale == 0, 0.0, 1.0 / scale)
  codes = nearest_e2m1(x * inverse[..., None])  # [..., G, 32]
  blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16], the even value low
  return blocks, (scale_bits >> 23).astype(jnp.uint8)


def nearest_e2m1(values: jax.Array) -> jax.Array:
  """float values, |v| <= 6 -> uint8 e2m1 codes, round to nearest with ties to the even code."""
  magnitude = jnp.abs(values)
  # A value passes the midpoint between codes c and c + 1 when above it, or at it when c is
  # odd (a tie then goes up to the even c + 1); its code counts the midpoints it passes.
  code = sum(((magnitude >= mid) if c % 2 else (magnitude > mid)).astype(jnp.uint8)
             for c, mid in enumerate(FP4_MIDPOINTS))
  return code | (jnp.signbit(values).astype(jnp.uint8) << 3)  # sign in bit 3, as in FP4_VALUES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mxfp4Experts:
  """A stack of expert matrices [E, in, out] held as MXFP4 ([E, out, in/32, 16] + scales).

  Indexing with expert ids decodes those experts only: `w[e]` -> [len(e), in, out] in dtype.
  With `layer`, blocks and scales are the stacks of every scanned layer ([L/2, E, ...]) and
  `w[e]` reads layer `layer`'s experts straight from them: no copy of a whole layer's blocks
  is made on the way (a gigabyte per layer at gpt-oss-120b widths).
  """

  blocks: jax.Array
  scales: jax.Array
  decode: Callable = dataclasses.field(metadata=dict(static=True))
  dtype: object = dataclasses.field(metadata=dict(static=True))
  layer: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, int, int]:
    experts, out, groups, _ = self.blocks.shape[-4:]
    return experts, groups * VALUES_PER_BLOCK, out

  def __getitem__(self, experts) -> jax.Array:
    index = experts if self.layer is None else (self.layer, experts)
    # Decoded [.., out, in]; the swap is folded into the following dot by XLA.
    return jnp.swapaxes(self.decode(self.blocks[index], self.scales[index], self.dtype), -1, -2)

  def dequantize(self) -> jax.Array:
    """Every expert, [E, in, out]."""
    index = slice(None) if self.layer is None else self.layer
    return jnp.swapaxes(self.decode(self.blocks[index], self.scales[index], self.dtype), -1, -2)
