"""What a model's forward pass returns, shared by GPT-OSS and GPT-2."""

import flax.struct
import jax
import jax.numpy as jnp

from nanogptoss_jax.model.kv_cache import LayerCache


@flax.struct.dataclass
class ModelOutput:
  """Logits [B, T, V], the updated KV cache (None without one), per-layer auxiliary stats.

  `hidden` is the final normalised hidden state [B, T, D], what the unembedding reads; `logits`
  is None when the forward pass was asked not to unembed (the training loss fuses that step).
  """

  logits: jax.Array | None
  hidden: jax.Array
  cache: list[LayerCache] | None
  aux: dict  # name -> array stacked over layers ([L] or [L, E]); empty for dense models


def default_positions(tokens: jax.Array) -> jax.Array:
  """Positions 0..T-1 for every row of tokens [B, T]."""
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
