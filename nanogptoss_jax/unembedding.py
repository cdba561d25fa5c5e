"""The unembedding (hidden state -> vocabulary logits) and its fused cross-entropy loss.

The kernel is stored [D, V] (nnx.Linear's layout; the reference's is [V, D]): batch-1 decoding
is one matrix-vector product with it, which XLA on CPU streams fastest this way (201,088-token
vocabulary: 5.6-6.0 ms against 7.7-9.3 ms as [V, D]); the training matmuls take the same time
in either layout.

`unembed_cross_entropy` is the training loss with a hand-written backward pass: the gradient of
softmax cross-entropy is `softmax - one_hot`, computed in one elementwise pass over the
exponentials the forward pass saved. Autodiff of the textbook loss instead recomputes them,
scatters the one-hot into a zero [N, V] array and transposes the [N, V] gradient before the
weight-gradient matmul: three more vocabulary-sized passes (bench-201k step 1.19 s -> 0.90 s).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.layers import dtype_of, normal_init, transposed


class Unembedding(nnx.Module):
  """Hidden states [..., D] -> float32 logits [..., V] through a [D, V] kernel."""

  def __init__(self, hidden_size: int, vocab_size: int, *, dtype: str = "float32",
               param_dtype: str = "float32", rngs: nnx.Rngs):
    self.dtype = dtype_of(dtype)
    self.kernel = nnx.Param(normal_init()(rngs.params(), (hidden_size, vocab_size),
                                          dtype_of(param_dtype)))

  def compute_kernel(self) -> jax.Array:
    """The kernel in the compute dtype (a differentiable cast)."""
    return self.kernel[...].astype(self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", x.astype(self.dtype), self.compute_kernel(),
                      preferred_element_type=jnp.float32)

  def cross_entropy(self, x: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-token loss [...] of hidden states x [..., D] against integer labels [...]."""
    flat = unembed_cross_entropy(x.reshape(-1, x.shape[-1]).astype(self.dtype),
                                 self.compute_kernel(), labels.reshape(-1))
    return flat.reshape(labels.shape)


def _unembed_softmax(hidden, kernel, labels):
  """(losses [N], unnormalised probabilities exp(logits - max) [N, V], 1 / their row sums [N])."""
  logits = jnp.einsum("nd,dv->nv", hidden, kernel, preferred_element_type=jnp.float32)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  exps = jnp.exp(logits - row_max)
  # The row sums as a matrix-vector product: XLA on CPU runs that on both cores, and its plain
  # sum-reduction over a 201,088-wide row on one (2x slower, measured).
  sums = exps @ jnp.ones((exps.shape[-1],), exps.dtype)
  losses = jnp.log(sums) + (row_max - label_logits)[:, 0]
  return losses, exps, 1.0 / sums


@jax.custom_vjp
def unembed_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array) -> jax.Array:
  """losses [N] = logsumexp(hidden @ kernel) - (hidden @ kernel)[label], float32.

  hidden [N, D] and kernel [D, V] in the compute dtype; labels [N] integer ids.
  """
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
  dhidden = jnp.einsum("nv,dv->nd", dlogits, kernel, preferred_element_type=jnp.float32)
  # hidden^T as a real [D, N] array: contracting N (the leading axis of both operands) as-is
  # sends XLA on CPU to a slow path that runs at half the usual matmul speed (105 vs 58 ms of
  # CPU time for nano's [128, 4096] x [4096, 4096]); the copy is tiny next to the product.
  dkernel = jnp.einsum("dn,nv->dv", transposed(hidden), dlogits,
                       preferred_element_type=jnp.float32)
  return dhidden.astype(hidden.dtype), dkernel.astype(kernel.dtype), None


unembed_cross_entropy.defvjp(_forward, _backward)
