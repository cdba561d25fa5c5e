"""MXFP4 decode by integer bit tricks (twin: `model.mxfp4.decode`, a LUT times 2^(scale-127)).

An e2m1 code s|e1 e0|m (e != 0) is 2^(e-1) * (1 + m/2): its exponent and mantissa bits are
already those of a float, so shifting the code's low three bits under the float's exponent
field and adding the block's (scale - 1) there gives the scaled value with no multiply and no
table. Code 1 (0.5, a subnormal in e2m1) gets the exponent alone, code 0 stays zero; the sign
bit moves to the top. bfloat16 is built directly in 16 bits (half the bytes of float32).
"""

import jax
import jax.numpy as jnp

# (same-width unsigned int, bit position of the exponent field) of each float we build.
_LAYOUT = {jnp.dtype(jnp.float32): (jnp.uint32, 23), jnp.dtype(jnp.bfloat16): (jnp.uint16, 7)}
VALUES_PER_BLOCK = 32


def decode(blocks: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
  """blocks uint8 [..., G, 16], scales uint8 [..., G] -> [..., G * 32] in dtype (f32 or bf16)."""
  dtype = jnp.dtype(dtype)
  int_type, shift = _LAYOUT.get(dtype, (jnp.uint32, 23))
  codes = jnp.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., G, 16, 2]
  codes = codes.reshape(*blocks.shape[:-1], VALUES_PER_BLOCK).astype(int_type)  # [..., G, 32]
  magnitude = codes & 7
  exponent = (scales.astype(int_type) - 1)[..., None] << shift  # the (e - 1) + scale offset
  sign = (codes & 8) << (shift + 5)  # code bit 3 -> the float's top bit
  bits = (jnp.where(magnitude >= 2, magnitude << (shift - 1), 0)
          + jnp.where(magnitude > 0, exponent, 0)) | sign
  built = dtype if dtype in _LAYOUT else jnp.dtype(jnp.float32)
  values = jax.lax.bitcast_convert_type(bits.astype(int_type), built)
  return values.reshape(*scales.shape[:-1], -1).astype(dtype)
