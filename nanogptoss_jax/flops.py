"""Model FLOPs per trained token (matmuls only), for model-FLOPs utilisation (MFU)."""

import jax
import jax.numpy as jnp

from nanogptoss_jax.config import Gpt2Config, GptOssConfig
from nanogptoss_jax.timing import best_time

# Training does the forward matmuls once and the backward twice (activation and weight grads).
TRAIN_PASSES = 3


def _mean_keys(context_len: int, window: int | None) -> float:
  """Average number of keys a query sees in a causal window over positions 0..T-1."""
  seen = [min(t + 1, window or context_len) for t in range(context_len)]
  return sum(seen) / context_len


def forward_flops_per_token(cfg: GptOssConfig | Gpt2Config, context_len: int) -> float:
  """2 * (multiply-adds) of one token's forward pass; embeddings lookups count as free."""
  d, layers = cfg.hidden_size, cfg.num_hidden_layers
  if isinstance(cfg, GptOssConfig):
    q_size = cfg.num_attention_heads * cfg.head_dim
    kv_size = cfg.num_key_value_heads * cfg.head_dim
    per_layer = d * (q_size + 2 * kv_size) + q_size * d  # qkv, out
    per_layer += d * cfg.num_experts  # router
    per_layer += cfg.experts_per_token * 3 * d * cfg.intermediate_size  # mlp1 (2F) + mlp2 (F)
    windows = [cfg.layer_window(layer) for layer in range(layers)]
  else:
    q_size = d
    per_layer = d * 3 * d + d * d + 2 * d * cfg.mlp_size
    windows = [None] * layers
  matmul = layers * per_layer + d * cfg.vocab_size  # + unembedding
  attention = sum(2 * _mean_keys(context_len, w) * q_size for w in windows)  # QK^T and PV
  return 2 * (matmul + attention)


def train_flops_per_token(cfg: GptOssConfig | Gpt2Config, context_len: int) -> float:
  return TRAIN_PASSES * forward_flops_per_token(cfg, context_len)


def measure_matmul_peak(size: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
  """This machine's best observed FLOP/s on a square matmul (the MFU denominator)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  return 2 * size ** 3 / best_time(lambda: matmul(a, b).block_until_ready(), repeats)
