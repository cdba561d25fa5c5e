"""The GPT-2 baseline in Flax NNX: learned positions, pre-LayerNorm, MHA, GELU MLP, untied head."""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model.attention import attend_with_cache
from nanogptoss_jax.model import axes
from nanogptoss_jax.model.config import Gpt2Config
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.kv_cache import LayerCache, empty_cache
from nanogptoss_jax.model.layers import linear, normal_init, residual_init
from nanogptoss_jax.model.output import ModelOutput, default_positions
from nanogptoss_jax.model.params import count_params
from nanogptoss_jax.model.unembedding import Unembedding

POSITION_INIT_STD = 0.01  # GPT-2's own choice for the position table


class Gpt2Attention(nnx.Module):
  """Multi-head causal self-attention with biases (GPT-2's c_attn / c_proj)."""

  def __init__(self, cfg: Gpt2Config, *, execution: ExecutionConfig, rngs: nnx.Rngs):
    self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
    self.impl, self.platform = execution.attention_impl, execution.platform
    dtype, param_dtype = execution.compute_dtype, execution.storage_dtype
    self.c_attn = linear(cfg.hidden_size, 3 * cfg.hidden_size, logical_axes=(axes.EMBED, axes.QKV),
                         matmul_impl=execution.matmul_impl,
                         dtype=dtype, param_dtype=param_dtype, kernel_init=normal_init(),
                         rngs=rngs)
    self.c_proj = linear(cfg.hidden_size, cfg.hidden_size, logical_axes=(axes.Q_HEADS, axes.EMBED),
                         matmul_impl=execution.matmul_impl,
                         dtype=dtype, param_dtype=param_dtype,
                         kernel_init=residual_init(cfg.num_hidden_layers), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x, positions, cache=None, *, in_order=False):
    batch, length, hidden = x.shape
    # Multi-head attention is grouped-query attention with one query per kv head (G = 1).
    q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
    q = q.reshape(batch, length, self.num_heads, 1, self.head_dim)  # [B, T, N, 1, H]
    k = k.reshape(batch, length, self.num_heads, self.head_dim)  # [B, T, N, H]
    v = v.reshape(batch, length, self.num_heads, self.head_dim)  # [B, T, N, H]
    out, cache = attend_with_cache(q, k, v, positions, cache, window=None, sinks=None,
                                   impl=self.impl, platform=self.platform, in_order=in_order)
    out = self.c_proj(out.reshape(batch, length, hidden))  # [B, T, D]
    return self.dropout(out), cache


class Gpt2Mlp(nnx.Module):
  """D -> 4D -> D with GELU (GPT-2's tanh approximation)."""

  def __init__(self, cfg: Gpt2Config, *, execution: ExecutionConfig, rngs: nnx.Rngs):
    dtype, param_dtype = execution.compute_dtype, execution.storage_dtype
    self.c_fc = linear(cfg.hidden_size, cfg.mlp_size, logical_axes=(axes.EMBED, axes.MLP),
                       matmul_impl=execution.matmul_impl,
                       dtype=dtype, param_dtype=param_dtype, kernel_init=normal_init(), rngs=rngs)
    self.c_proj = linear(cfg.mlp_size, cfg.hidden_size, logical_axes=(axes.MLP, axes.EMBED),
                         matmul_impl=execution.matmul_impl,
                         dtype=dtype, param_dtype=param_dtype,
                         kernel_init=residual_init(cfg.num_hidden_layers), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)

  def __call__(self, x):
    return self.dropout(self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=True)))


class Gpt2Block(nnx.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

  def __init__(self, cfg: Gpt2Config, *, execution: ExecutionConfig, rngs: nnx.Rngs):
    norm = dict(epsilon=cfg.layer_norm_eps, dtype=execution.compute_dtype,
                param_dtype=execution.storage_dtype, scale_metadata=axes.names(axes.NORM),
                bias_metadata=axes.names(axes.NORM), rngs=rngs)
    self.ln_1 = nnx.LayerNorm(cfg.hidden_size, **norm)
    self.attn = Gpt2Attention(cfg, execution=execution, rngs=rngs)
    self.ln_2 = nnx.LayerNorm(cfg.hidden_size, **norm)
    self.mlp = Gpt2Mlp(cfg, execution=execution, rngs=rngs)

  def __call__(self, x, positions, cache=None, *, in_order=False):
    attn_out, cache = self.attn(self.ln_1(x), positions, cache, in_order=in_order)
    x = x + attn_out
    return x + self.mlp(self.ln_2(x)), cache


class Gpt2(nnx.Module):
  """Token ids [B, T] -> logits [B, T, V]; `cfg` says what it computes, `execution` how."""

  def __init__(self, cfg: Gpt2Config, *, execution: ExecutionConfig | None = None,
               rngs: nnx.Rngs):
    execution = execution or ExecutionConfig()
    self.cfg, self.execution = cfg, execution
    dtype, param_dtype = execution.compute_dtype, execution.storage_dtype
    self.wte = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=normal_init(),
                         embedding_metadata=axes.names(axes.VOCAB, axes.EMBED), rngs=rngs)
    self.wpe = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                         param_dtype=param_dtype, embedding_init=normal_init(POSITION_INIT_STD),
                         embedding_metadata=axes.names(axes.POSITIONS, axes.EMBED), rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs)
    self.blocks = nnx.List([Gpt2Block(cfg, execution=execution, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.ln_f = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                              param_dtype=param_dtype, scale_metadata=axes.names(axes.NORM),
                              bias_metadata=axes.names(axes.NORM), rngs=rngs)
    self.unembedding = Unembedding(cfg.hidden_size, cfg.vocab_size, dtype=execution.dtype,
                                   param_dtype=execution.param_dtype,
                                   loss_impl=execution.loss_impl, rngs=rngs)  # GPT-2's lm_head

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.forward(tokens).logits

  def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
              cache: list[LayerCache] | None = None, *, unembed: bool = True,
              moe_groups: int = 1) -> ModelOutput:
    """Same contract as GptOss.forward (`moe_groups` unused: GPT-2 has no experts)."""
    del moe_groups
    in_order = positions is None  # then attention may skip key blocks that follow the queries
    if in_order:
      # Only this case is checkable here (positions are traced); the table lookup would fill
      # rows past its end with NaN, which attention then spreads to every position.
      if tokens.shape[1] > self.cfg.max_position_embeddings:
        raise ValueError(f"{tokens.shape[1]} tokens exceed GPT-2's max_position_embeddings="
                         f"{self.cfg.max_position_embeddings}")
      positions = default_positions(tokens)
    # Padding positions (< 0) read row 0 of the table; their outputs are never used.
    x = self.dropout(self.wte(tokens) + self.wpe(jnp.maximum(positions, 0)))  # [B, T, D]
    new_cache = []
    for layer, block in enumerate(self.blocks):
      x, layer_cache = block(x, positions, None if cache is None else cache[layer],
                             in_order=in_order)
      new_cache.append(layer_cache)
    hidden = self.ln_f(x)
    logits = self.unembedding(hidden) if unembed else None  # [B, T, V] float32
    return ModelOutput(logits=logits, hidden=hidden, cache=None if cache is None else new_cache,
                       aux={})

  def init_cache(self, batch: int, max_length: int) -> list[LayerCache]:
    cfg = self.cfg
    return [empty_cache(batch, max_length, cfg.num_attention_heads, cfg.head_dim,
                        self.execution.compute_dtype) for _ in range(cfg.num_hidden_layers)]

  def param_counts(self) -> dict[str, int]:
    """{"total", "active"}: a dense model uses every parameter for every token."""
    total = count_params(self)
    return {"total": total, "active": total}
