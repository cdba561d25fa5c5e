"""The unembedding's cross-entropy with a hand-written backward pass (twin:
`model.unembedding.plain_cross_entropy`).

The gradient of softmax cross-entropy is `softmax - one_hot`, computed in one elementwise pass
over the exponentials the forward pass saved. Autodiff of the textbook loss instead recomputes
them, scatters the one-hot into a zero [M, V] array and transposes the [M, V] gradient before
the weight-gradient matmul: three more vocabulary-sized passes.
"""

import jax
import jax.numpy as jnp

from nanogptoss_jax.kernels.matmul import transposed


def _unembed_softmax(hidden, kernel, labels):
  """(losses [M], unnormalised probabilities exp(logits - max) [M, V], 1 / their row sums [M])."""
  logits = jnp.einsum("md,dv->mv", hidden, kernel, preferred_element_type=jnp.float32)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  exps = jnp.exp(logits - row_max)
  # The row sums as a matrix-vector product: XLA on CPU runs that on every core, and a plain
  # sum-reduction over a vocabulary-wide row on one.
  sums = exps @ jnp.ones((exps.shape[-1],), exps.dtype)
  losses = jnp.log(sums) + (row_max - label_logits)[:, 0]
  return losses, exps, 1.0 / sums


def unembed_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                          weights: jax.Array | None = None) -> jax.Array:
  """losses [M] = weight * (logsumexp(hidden @ kernel) - (hidden @ kernel)[label]), float32.

  hidden [M, D] and kernel [D, V] in the compute dtype; labels [M] integer ids; weights [M]
  (default 1) scale each token's loss and so its gradient (the backward's upstream).
  """
  losses = _fused(hidden, kernel, labels)
  return losses if weights is None else losses * weights


@jax.custom_vjp
def _fused(hidden: jax.Array, kernel: jax.Array, labels: jax.Array) -> jax.Array:
  return _unembed_softmax(hidden, kernel, labels)[0]


def _forward(hidden, kernel, labels):
  losses, exps, inverse_sums = _unembed_softmax(hidden, kernel, labels)
  return losses, (hidden, kernel, labels, exps, inverse_sums)


def _backward(residuals, upstream):
  hidden, kernel, labels, exps, inverse_sums = residuals
  vocab = jnp.arange(exps.shape[-1], dtype=labels.dtype)
  one_hot = labels[:, None] == vocab[None, :]
  softmax = exps * inverse_sums[:, None]
  dlogits = ((softmax - one_hot) * upstream[:, None]).astype(hidden.dtype)
  dhidden = jnp.einsum("mv,dv->md", dlogits, kernel, preferred_element_type=jnp.float32)
  # hidden^T as a real [D, M] array: contracting M (the leading axis of both operands) as-is
  # sends XLA on CPU to a slow path; the copy is tiny next to the product.
  dkernel = jnp.einsum("dm,mv->dv", transposed(hidden), dlogits,
                       preferred_element_type=jnp.float32)
  return dhidden.astype(hidden.dtype), dkernel.astype(kernel.dtype), None


_fused.defvjp(_forward, _backward)
