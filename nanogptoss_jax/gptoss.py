"""The GPT-OSS transformer in Flax NNX (same math as OpenAI's `gpt_oss.torch.model`, batched)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.attention import Attention, LayerCache, empty_cache
from nanogptoss_jax.config import GptOssConfig
from nanogptoss_jax.layers import RMSNorm, dtype_of, normal_init
from nanogptoss_jax.model_output import ModelOutput, default_positions
from nanogptoss_jax.moe import MoE
from nanogptoss_jax.rope import rope_tables, rope_tables_in_order
from nanogptoss_jax.unembedding import Unembedding


class Block(nnx.Module):
  """Pre-norm residual block: attention (sliding on even layers) then the MoE MLP."""

  def __init__(self, cfg: GptOssConfig, layer: int, *, rngs: nnx.Rngs):
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.mlp = MoE(cfg, rngs=rngs)

  def __call__(self, x, positions, rope, cache=None, *, moe_groups=1, in_order=False):
    attn_out, cache = self.attn(x, positions, rope, cache, in_order=in_order)
    x = x + attn_out
    mlp_out, stats = self.mlp(x, groups=moe_groups)
    return x + mlp_out, cache, stats


class GptOss(nnx.Module):
  """Token ids [B, T] -> logits [B, T, V]."""

  def __init__(self, cfg: GptOssConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    self.embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                               param_dtype=param_dtype, embedding_init=normal_init(), rngs=rngs)
    self.blocks = nnx.List([Block(cfg, layer, rngs=rngs) for layer in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, param_dtype=cfg.param_dtype, rngs=rngs)
    self.unembedding = Unembedding(cfg.hidden_size, cfg.vocab_size, dtype=cfg.dtype,
                                   param_dtype=cfg.param_dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.forward(tokens).logits

  def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
              cache: list[LayerCache] | None = None, *, moe_groups: int = 1,
              unembed: bool = True) -> ModelOutput:
    """Logits for tokens [B, T] at `positions` [B, T] (default 0..T-1; negative = padding)."""
    in_order = positions is None  # then attention may skip key blocks that follow the queries
    if in_order:
      positions = default_positions(tokens)
    # Shared by every layer; with implied positions every row has the same table: [1, T, H/2].
    rope = (rope_tables_in_order(self.cfg, tokens.shape[1]) if in_order
            else rope_tables(self.cfg, positions))
    x = self.embedding(tokens)  # [B, T, D]
    new_cache, stats = [], []
    for layer, block in enumerate(self.blocks):
      x, layer_cache, layer_stats = block(x, positions, rope, None if cache is None else cache[layer],
                                          moe_groups=moe_groups, in_order=in_order)
      new_cache.append(layer_cache)
      stats.append(layer_stats)
    hidden = self.norm(x)
    logits = self.unembedding(hidden) if unembed else None  # [B, T, V] float32
    aux = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
    return ModelOutput(logits=logits, hidden=hidden, cache=None if cache is None else new_cache,
                       aux=aux)

  def init_cache(self, batch: int, max_length: int) -> list[LayerCache]:
    """An empty cache for `max_length` positions; sliding layers keep only a window-sized ring."""
    cfg = self.cfg
    slots = [min(cfg.layer_window(layer) or max_length, max_length)
             for layer in range(cfg.num_hidden_layers)]
    return [empty_cache(batch, s, cfg.num_key_value_heads, cfg.head_dim, dtype_of(cfg.dtype))
            for s in slots]
