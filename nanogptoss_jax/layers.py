"""Primitives shared by both models: initialisers, RMSNorm, dtype helpers, a matmul."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.config import DTYPES

# Initialisation (both models): weights ~ N(0, 0.02) as in GPT-2; projections that write into
# the residual stream are scaled by 1/sqrt(2 * layers) so the stream's variance does not grow
# with depth; biases start at zero and norm scales at one.
INIT_STD = 0.02
RMS_NORM_EPS = 1e-5


def normal_init(std: float = INIT_STD) -> nnx.Initializer:
  return nnx.initializers.normal(stddev=std)


def residual_init(num_layers: int) -> nnx.Initializer:
  """Init for matrices whose output is added to the residual stream."""
  return normal_init(INIT_STD / math.sqrt(2 * num_layers))


def dtype_of(name: str) -> jnp.dtype:
  return DTYPES[name]


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in float32 whatever the compute dtype (as the reference)."""

  def __init__(self, num_features: int, *, param_dtype: str = "float32", rngs: nnx.Rngs):
    del rngs  # deterministic init; kept for the uniform (cfg, *, rngs) signature
    self.scale = nnx.Param(jnp.ones((num_features,), dtype_of(param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.astype(jnp.float32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + RMS_NORM_EPS)
    return (t * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def transposed(x: jax.Array) -> jax.Array:
  """x with its last two axes swapped, as a real array for a matmul to read: behind
  `optimization_barrier`, XLA cannot fold the transpose back into the product."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


# A matmul whose backward pass hands XLA plain [.., M, K] x [K, N] products. Autodiff's input
# gradient, dy @ w^T, contracts the minor axis of both operands as they lie, and XLA's CPU
# matmul runs that at about half speed: nano's MoE input gradients took 18 ms each against 9
# for the forward's. An explicit transposed copy of w (`transposed`) costs a small fraction of
# that (nano train step 541 -> 513 ms, most of it from the experts).
@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., K] @ w [K, N], or batched: x [*L, M, K] @ w [*L, K, N] -> [*L, M, N]."""
  if w.ndim > 2 and w.shape[:-2] != x.shape[:-2]:
    raise ValueError(f"matmul batches x {x.shape} and w {w.shape} over equal leading axes only")
  return jnp.matmul(x, w)


def _matmul_forward(x, w):
  return matmul(x, w), (x, w)


def _matmul_backward(residuals, dy):
  x, w = residuals
  dx = jnp.matmul(dy, transposed(w))
  # w's gradient sums over x's rows (for a [K, N] w, over all of x's leading axes).
  lead = w.shape[:-2]
  rows_x = x.reshape(*lead, -1, x.shape[-1])  # [*L, M, K]
  rows_dy = dy.reshape(*lead, -1, dy.shape[-1])  # [*L, M, N]
  dw = jnp.einsum("...mk,...mn->...kn", rows_x, rows_dy)
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       out_sharding=None):
  """`nnx.Linear(..., dot_general=linear_dot_general)`: its product through `matmul`."""
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"linear_dot_general serves nnx.Linear only, got {dimension_numbers}")
  if precision is not None or out_sharding is not None:  # `matmul` would silently drop them
    raise ValueError(f"linear_dot_general takes the default precision and out_sharding only, got "
                     f"precision={precision!r}, out_sharding={out_sharding!r}")
  out = matmul(lhs, rhs)
  return out if preferred_element_type is None else out.astype(preferred_element_type)


def linear(in_features: int, out_features: int, **kwargs) -> nnx.Linear:
  """`nnx.Linear` (same parameters and checkpoints) whose backward pass goes through `matmul`."""
  return nnx.Linear(in_features, out_features, dot_general=linear_dot_general, **kwargs)
