"""The fused unembedding cross-entropy against autodiff of the textbook loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanogptoss_jax.kernels.cross_entropy import unembed_cross_entropy

N, D, V = 12, 16, 50


def _inputs(seed: int):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(0.0, 1.0, (N, D)), jnp.float32)
  kernel = jnp.asarray(rng.normal(0.0, 0.5, (D, V)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, V, N), jnp.int32)
  upstream = jnp.asarray(rng.normal(0.0, 1.0, N), jnp.float32)  # per-token loss weights
  return hidden, kernel, labels, upstream


def _textbook(hidden, kernel, labels):
  return optax.softmax_cross_entropy_with_integer_labels(hidden @ kernel, labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_values_and_gradients_match_autodiff(seed):
  hidden, kernel, labels, upstream = _inputs(seed)
  np.testing.assert_allclose(unembed_cross_entropy(hidden, kernel, labels),
                             _textbook(hidden, kernel, labels), rtol=1e-6, atol=1e-6)
  # A non-uniform upstream gradient checks the per-token scaling of the backward pass.
  ours = jax.grad(lambda h, w: (unembed_cross_entropy(h, w, labels) * upstream).sum(),
                  argnums=(0, 1))(hidden, kernel)
  theirs = jax.grad(lambda h, w: (_textbook(h, w, labels) * upstream).sum(),
                    argnums=(0, 1))(hidden, kernel)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_stays_close_and_keeps_dtypes():
  hidden, kernel, labels, _ = _inputs(2)
  loss = lambda h, w: unembed_cross_entropy(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                                            labels).mean()
  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel)
  exact, exact_grads = jax.value_and_grad(lambda h, w: _textbook(h, w, labels).mean(),
                                          argnums=(0, 1))(hidden, kernel)
  assert value.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in grads)
  assert abs(float(value - exact)) < 0.05 * float(exact)
  for g, e in zip(grads, exact_grads):
    assert float(jnp.linalg.norm(g - e)) < 0.05 * float(jnp.linalg.norm(e))


def test_huge_logits_stay_finite():
  """Logits in the thousands: exp would overflow without the row maximum taken out first."""
  hidden, kernel, labels, upstream = _inputs(3)
  kernel = kernel * 1000.0
  losses, grads = jax.value_and_grad(
      lambda h, w: (unembed_cross_entropy(h, w, labels) * upstream).sum(), argnums=(0, 1))(
          hidden, kernel)
  assert np.isfinite(float(losses)) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_allclose(unembed_cross_entropy(hidden, kernel, labels),
                             _textbook(hidden, kernel, labels), rtol=1e-5)
