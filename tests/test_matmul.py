"""`layers.matmul` (a hand-written backward pass) against autodiff of jnp.matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.kernels.matmul import matmul
from nanogptoss_jax.model.layers import linear

SHAPES = [  # (x, w): a Linear on [B, T, K] and on [N, K]; the MoE's per-block products
    ((2, 5, 6), (6, 7)),
    ((5, 6), (6, 7)),
    ((3, 4, 6), (3, 6, 7)),
]


def _arrays(shapes, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.normal(0.0, 1.0, shape), jnp.float32) for shape in shapes]


def _check_grads(ours, theirs, *args):
  """Values and gradients of sum(f(*args) * upstream) agree for both functions."""
  upstream = _arrays([jax.eval_shape(theirs, *args).shape], seed=1)[0]
  loss = lambda f: lambda *a: jnp.sum(f(*a) * upstream)
  argnums = tuple(range(len(args)))
  np.testing.assert_allclose(ours(*args), theirs(*args), rtol=1e-6, atol=1e-6)
  grads = [jax.grad(loss(f), argnums)(*args) for f in (ours, theirs)]
  for got, want in zip(*grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, w_shape", SHAPES)
def test_matmul_matches_autodiff(x_shape, w_shape):
  x, w = _arrays([x_shape, w_shape])
  _check_grads(jax.jit(matmul), jnp.matmul, x, w)


def test_matmul_refuses_mismatched_batches():
  x, w = _arrays([(3, 2, 4, 6), (3, 6, 7)])
  with pytest.raises(ValueError, match="equal leading axes"):
    matmul(x, w)


def test_matmul_under_vmap_with_a_shared_weight():
  """The MoE vmaps over token groups with the weights unbatched: w's gradient sums the groups."""
  x, w = _arrays([(2, 3, 4, 6), (3, 6, 7)])
  vmapped = lambda f: jax.vmap(f, in_axes=(0, None))
  _check_grads(vmapped(matmul), vmapped(jnp.matmul), x, w)


def test_linear_matches_plain_nnx_linear():
  """Same parameters and values as nnx.Linear, and the same gradients."""
  ours = linear(6, 7, rngs=nnx.Rngs(0))
  plain = nnx.Linear(6, 7, rngs=nnx.Rngs(0))
  x = _arrays([(2, 5, 6)])[0]
  apply = lambda layer: lambda kernel, bias, x: nnx.merge(
      nnx.graphdef(layer), nnx.State({"kernel": kernel, "bias": bias}))(x)
  state = nnx.state(plain)
  _check_grads(apply(ours), apply(plain), state["kernel"][...], state["bias"][...], x)


def test_linear_refuses_settings_matmul_would_drop():
  layer = linear(6, 7, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="default precision and out_sharding only"):
    layer(_arrays([(2, 6)])[0])
