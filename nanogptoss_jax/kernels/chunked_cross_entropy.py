"""The unembedding's cross-entropy in token chunks (twin: `model.unembedding.plain_cross_entropy`).

The fused loss (kernels/cross_entropy.py) saves the exponentials of all [M, V] logits for its
backward pass: 16 GB at 5 x 4,000 tokens and the 201,088-token vocabulary. This one saves only
each token's log-sum-exp and recomputes its chunk's logits in the backward pass, so at most one
[chunk, V] float32 block lives at a time (one extra unembedding matmul per chunk).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Logits per chunk: 2^26 float32 values (256 MiB) whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 26


def chunk_tokens(vocab: int) -> int:
  return max(8, CHUNK_ELEMENTS // vocab // 8 * 8)


def chunked_cross_entropy(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                          weights: jax.Array | None = None, chunk: int | None = None) -> jax.Array:
  """losses [M] = weight * (logsumexp(hidden @ kernel) - (hidden @ kernel)[label]), float32.

  hidden [M, D] and kernel [D, V] in the compute dtype; labels [M] integer ids; weights [M]
  (default 1) scale each token's loss and its gradient.
  """
  tokens = hidden.shape[0]
  chunk = min(chunk or chunk_tokens(kernel.shape[1]), tokens)
  # As many chunks as that size needs, shrunk to share the tokens evenly: little padding.
  count = -(-tokens // chunk)
  chunk = -(-tokens // count)
  padded = count * chunk
  # Padding tokens (zero hidden state, label 0) get a zero upstream gradient: they add nothing.
  hidden_p = jnp.pad(hidden, ((0, padded - tokens), (0, 0)))
  labels_p = jnp.pad(labels.astype(jnp.int32), (0, padded - tokens))
  losses = _chunked(hidden_p, kernel, labels_p, chunk)[:tokens]
  return losses if weights is None else losses * weights


def _chunk_logits(hidden, kernel, labels, chunk, i):
  rows = lax.dynamic_slice_in_dim(hidden, i * chunk, chunk)
  ids = lax.dynamic_slice_in_dim(labels, i * chunk, chunk)
  return rows, ids, jnp.einsum("md,dv->mv", rows, kernel, preferred_element_type=jnp.float32)


def _forward_losses(hidden, kernel, labels, chunk):
  def one_chunk(i):
    _, ids, logits = _chunk_logits(hidden, kernel, labels, chunk, i)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return lse - jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0], lse

  losses, lse = lax.map(one_chunk, jnp.arange(hidden.shape[0] // chunk))
  return losses.reshape(-1), lse.reshape(-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked(hidden, kernel, labels, chunk):
  return _forward_losses(hidden, kernel, labels, chunk)[0]


def _fwd(hidden, kernel, labels, chunk):
  losses, lse = _forward_losses(hidden, kernel, labels, chunk)
  return losses, (hidden, kernel, labels, lse)


def _bwd(chunk, residuals, upstream):
  hidden, kernel, labels, lse = residuals
  vocab = jnp.arange(kernel.shape[1], dtype=jnp.int32)

  def one_chunk(i, carry):
    dhidden, dkernel = carry
    rows, ids, logits = _chunk_logits(hidden, kernel, labels, chunk, i)
    softmax = jnp.exp(logits - lax.dynamic_slice_in_dim(lse, i * chunk, chunk)[:, None])
    up = lax.dynamic_slice_in_dim(upstream, i * chunk, chunk)[:, None]
    dlogits = ((softmax - (ids[:, None] == vocab[None, :])) * up).astype(hidden.dtype)
    drows = jnp.einsum("mv,dv->md", dlogits, kernel, preferred_element_type=jnp.float32)
    dkernel = dkernel + jnp.einsum("dm,mv->dv", rows.T, dlogits,
                                   preferred_element_type=jnp.float32)
    return lax.dynamic_update_slice_in_dim(dhidden, drows, i * chunk, axis=0), dkernel

  start = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
  dhidden, dkernel = lax.fori_loop(0, hidden.shape[0] // chunk, one_chunk, start)
  return dhidden.astype(hidden.dtype), dkernel.astype(kernel.dtype), None


_chunked.defvjp(_fwd, _bwd)
