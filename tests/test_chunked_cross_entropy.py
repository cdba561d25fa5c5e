"""The chunked cross-entropy (kernels/chunked_cross_entropy.py) equals the fused and the plain
one: losses and both gradients, with token counts that are no multiple of the chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanogptoss_jax.kernels.chunked_cross_entropy import chunked_cross_entropy
from nanogptoss_jax.kernels.cross_entropy import unembed_cross_entropy
from nanogptoss_jax.model import choices
from nanogptoss_jax.model.unembedding import plain_cross_entropy
from tests.factories import normal, relative_error

TOLERANCE = 1e-5




@pytest.mark.parametrize("tokens, chunk", [(37, 8), (5, 64)])
def test_chunked_cross_entropy_equals_fused_and_plain(tokens, chunk):
  hidden, kernel = normal((tokens, 16), 0), normal((16, 301), 1) * 3
  labels = jnp.asarray(np.random.default_rng(2).integers(0, 301, tokens))
  upstream = normal((tokens,), 3)
  chunked = lambda h, w, y: chunked_cross_entropy(h, w, y, chunk=chunk)

  def value_and_grads(fn):
    loss = lambda h, w: jnp.sum(fn(h, w, labels) * upstream)
    return fn(hidden, kernel, labels), jax.jit(jax.grad(loss, (0, 1)))(hidden, kernel)

  ours = value_and_grads(chunked)
  for theirs in (value_and_grads(unembed_cross_entropy), value_and_grads(plain_cross_entropy)):
    for name, a, b in zip(("loss", "dhidden", "dkernel"), (ours[0],) + ours[1],
                          (theirs[0],) + theirs[1]):
      err = relative_error(a, b)
      assert err <= TOLERANCE, f"{name}: relative error {err:.2e}"


def test_auto_loss_goes_chunked_when_the_logits_would_not_fit():
  assert choices.loss_impl("auto", 1024, 201088) == "fused"  # bench_201k's micro-batch
  assert choices.loss_impl("auto", 20000, 201088) == "chunked"  # the seed's 5 x 4,000
