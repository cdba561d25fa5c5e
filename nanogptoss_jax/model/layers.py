"""Primitives shared by both models: initialisers, RMSNorm, dtype helpers, linear layers."""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from nanogptoss_jax.kernels import matmul as kernel_matmul
from nanogptoss_jax.model import axes, choices
from nanogptoss_jax.model.execution import DTYPES

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
    self.scale = nnx.Param(jnp.ones((num_features,), dtype_of(param_dtype)), **axes.names(axes.NORM))

  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.astype(jnp.float32)
    t = t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + RMS_NORM_EPS)
    return (t * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def matmul_for(impl: str):
  """The matmul a config's `matmul_impl` picks: x [..., K] @ w [K, N] (batched: [*L, M, K] @
  [*L, K, N]); `plain` is jnp.matmul."""
  return {"plain": jnp.matmul, "transposed_grad": kernel_matmul.matmul}[choices.matmul_impl(impl)]


def linear(in_features: int, out_features: int, *, logical_axes: tuple[str, str] | None = None,
           matmul_impl: str = "auto", **kwargs) -> nnx.Linear:
  """`nnx.Linear` whose product runs through the matmul `matmul_impl` picks (same parameters);
  `logical_axes` names the kernel's (in, out) axes (model/axes.py; every model layer does)."""
  dot_general = (kernel_matmul.linear_dot_general
                 if choices.matmul_impl(matmul_impl) == "transposed_grad" else jax.lax.dot_general)

  def named_dot_general(*args, **options):
    # The `matmuls` remat policy keeps exactly these values: `dots_saveable` cannot see the
    # product inside the custom-VJP matmul.
    return checkpoint_name(dot_general(*args, **options), choices.MATMUL_OUTPUT)

  if logical_axes is not None:
    kwargs |= dict(kernel_metadata=axes.names(*logical_axes),
                   bias_metadata=axes.names(logical_axes[1]))
  return nnx.Linear(in_features, out_features, dot_general=named_dot_general, **kwargs)
