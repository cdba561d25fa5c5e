"""A matmul whose backward pass hands XLA plain [.., M, K] x [K, N] products.

Autodiff's input gradient, dy @ w^T, contracts the minor axis of both operands as they lie,
and XLA's CPU matmul runs that at about half speed. An explicit transposed copy of w costs a
small fraction of the product it speeds up. The plain twin is `jnp.matmul`.
"""

import jax
import jax.numpy as jnp


def transposed(x: jax.Array) -> jax.Array:
  """x with its last two axes swapped, as a real array for a matmul to read: behind
  `optimization_barrier`, XLA cannot fold the transpose back into the product."""
  return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


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
