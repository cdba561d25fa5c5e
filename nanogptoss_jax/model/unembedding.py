"""The unembedding (hidden state -> vocabulary logits) and the training loss on top of it.

The kernel is stored [D, V] (nnx.Linear's layout; the reference's is [V, D]): batch-1 decoding
is one matrix-vector product with it, which XLA on CPU streams fastest this way.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.kernels.chunked_cross_entropy import chunked_cross_entropy
from nanogptoss_jax.kernels.cross_entropy import unembed_cross_entropy
from nanogptoss_jax.model import axes, choices
from nanogptoss_jax.model.layers import dtype_of, normal_init


def plain_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                        weights: jax.Array | None = None) -> jax.Array:
  """losses [M] = weight * (logsumexp(logits) - logits[label]) with logits = hidden [M, D] @
  kernel [D, V]; weights [M] default to one."""
  logits = jnp.einsum("md,dv->mv", hidden, kernel, preferred_element_type=jnp.float32)
  label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  losses = jax.nn.logsumexp(logits, axis=-1) - label_logits
  return losses if weights is None else losses * weights


CROSS_ENTROPY = {"plain": plain_cross_entropy, "fused": unembed_cross_entropy,
                 "chunked": chunked_cross_entropy}


class Unembedding(nnx.Module):
  """Hidden states [..., D] -> float32 logits [..., V] through a [D, V] kernel."""

  def __init__(self, hidden_size: int, vocab_size: int, *, dtype: str = "float32",
               param_dtype: str = "float32", loss_impl: str = "auto", rngs: nnx.Rngs):
    self.dtype = dtype_of(dtype)
    self.loss_impl = loss_impl
    self.kernel = nnx.Param(normal_init()(rngs.params(), (hidden_size, vocab_size),
                                          dtype_of(param_dtype)),
                            **axes.names(axes.EMBED, axes.VOCAB))

  def compute_kernel(self) -> jax.Array:
    """The kernel in the compute dtype (a differentiable cast)."""
    return self.kernel[...].astype(self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", x.astype(self.dtype), self.compute_kernel(),
                      preferred_element_type=jnp.float32)

  def cross_entropy(self, x: jax.Array, labels: jax.Array,
                    weights: jax.Array | None = None) -> jax.Array:
    """Per-token loss [...] of hidden states x [..., D] against integer labels [...], each
    scaled by its weight [...] (default one)."""
    tokens, vocab = labels.size, self.kernel.shape[1]
    loss_fn = CROSS_ENTROPY[choices.loss_impl(self.loss_impl, tokens, vocab)]
    flat = loss_fn(x.reshape(-1, x.shape[-1]).astype(self.dtype), self.compute_kernel(),
                   labels.reshape(-1), None if weights is None else weights.reshape(-1))
    return flat.reshape(labels.shape)
