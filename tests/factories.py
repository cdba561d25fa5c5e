"""What every test module builds from: one tiny config, seeded random weights (biases and sinks
included), seeded draws, and one tolerance measure."""

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax import GptOss, GptOssConfig

# Big enough for every mechanism to matter (two layers of both window kinds, a router choosing 2
# of 4 experts, 2 query heads per kv head), small enough to compile in seconds.
TINY_FIELDS = dict(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=97,
                   hidden_size=32, intermediate_size=24, head_dim=16, num_attention_heads=4,
                   num_key_value_heads=2, sliding_window=5, rope_scaling_factor=1.0)


def tiny_config(**changes) -> GptOssConfig:
  """The tests' GptOssConfig; `changes` override single fields (e.g. sliding_window=4)."""
  return GptOssConfig(**(TINY_FIELDS | changes))


def random_params(abstract: nnx.Module, seed: int) -> nnx.State:
  """A seeded draw for every parameter of `abstract`. The default init zeroes biases and sinks
  (so a bug that hands one layer's sinks to another would pass unseen): here every one differs."""
  rng = np.random.default_rng(seed)
  params = nnx.state(abstract, nnx.Param)
  for path, variable in nnx.to_flat_state(params):
    name, shape = str(path[-1]), variable.shape
    if variable.dtype == jnp.uint8:  # MXFP4 blocks and scales: any bytes are valid codes
      value = rng.integers(0, 256, shape)
      if name.endswith("scales"):  # biased exponents near 2^0 keep activations O(1)
        value = rng.integers(124, 130, shape)
    elif name == "scale":
      value = 1.0 + rng.normal(0.0, 0.1, shape)
    elif name.endswith("bias") or name == "sinks":
      value = rng.normal(0.0, 1.0 if name == "sinks" else 0.1, shape)
    elif name == "embedding" or len(shape) < 2:
      value = rng.normal(0.0, 1.0, shape)
    else:  # [in, out] or [E, in, out] (stacked: [L, ...]): 1/sqrt(fan_in) keeps activations O(1)
      value = rng.normal(0.0, 1.0 / math.sqrt(shape[-2]), shape)
    variable.set_value(jnp.asarray(value, variable.dtype))
  return params


def random_module(cls, cfg, seed: int = 0, execution=None):
  """cls(cfg) holding seeded random weights; the draws depend only on the parameter shapes.

  Built abstractly and then filled: running the real initialisers eagerly costs seconds here.
  """
  abstract = nnx.eval_shape(lambda: cls(cfg, execution=execution, rngs=nnx.Rngs(0)))
  return nnx.merge(nnx.graphdef(abstract), random_params(abstract, seed))


def random_model(cfg: GptOssConfig | None = None, seed: int = 0, execution=None) -> GptOss:
  """A GptOss of `cfg` (the tiny config by default) with seeded random weights."""
  return random_module(GptOss, cfg or tiny_config(), seed, execution)


def normal(shape, seed: int, dtype=jnp.float32):
  """Seeded standard normal draws as a jax array (drawn by numpy: eager jax.random compiles a
  kernel per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def relative_error(ours, ref) -> float:
  """max|ours - ref| / max|ref|, in float64 so the figure itself carries no rounding.

  An all-zero ref (say, the gradient of an expert no token chose) demands an all-zero ours.
  """
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  scale = np.max(np.abs(ref))
  if scale == 0:
    return 0.0 if not np.any(ours) else math.inf
  return float(np.max(np.abs(ours - ref)) / scale)


def assert_close(ours, ref, tolerance: float, what: str = "") -> None:
  """relative_error(ours, ref) <= tolerance, saying what and by how much when not."""
  error = relative_error(ours, ref)
  assert error <= tolerance, f"{what}: relative error {error:.3g} > {tolerance:g}"
