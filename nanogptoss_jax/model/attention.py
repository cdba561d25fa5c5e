"""Causal attention with learned sinks and sliding windows, over an optional KV cache.

Everything is driven by explicit token positions: a key is visible to a query when its position
is known (>= 0), not after the query's, and (on sliding layers) fewer than `window` positions
before it. The same rule serves training (keys = the sequence itself), prefill and decode
(keys = the cache), and batches whose rows sit at different positions.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.kernels.attention import MASKED, blocked_attention
from nanogptoss_jax.kernels.flash_attention import flash_attention
from nanogptoss_jax.kernels.pallas_attention import pallas_attention
from nanogptoss_jax.kernels.splash_attention import splash_attention
from nanogptoss_jax.model import adapters, axes, choices, int8
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.kv_cache import LayerCache, cache_write, layer_view
from nanogptoss_jax.model.layers import RMSNorm, linear, normal_init, residual_init
from nanogptoss_jax.model.rope import apply_rope


def visible(q_pos: jax.Array, k_pos: jax.Array, window: int | None) -> jax.Array:
  """[B, T, S] bool: key s is visible to query t (causal, known, within the window)."""
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  ok = (k >= 0) & (k <= q)
  if window is not None:
    ok &= q - k < window  # `window` keys, the query's own position included
  return ok


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, *,
              window: int | None, sinks: jax.Array | None) -> jax.Array:
  """Grouped-query attention with a sink: q [B, T, K, G, H], k/v [B, K, S, H] -> [B, T, K, G, H].

  The G query heads of a group share one key/value head. `sinks` [K, G] holds one learned logit
  per query head that joins the softmax as an extra column with no value: it soaks up
  probability mass (so a head may attend to nothing) and is dropped afterwards.
  """
  head_dim = q.shape[-1]
  scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * head_dim ** -0.5  # [B, K, G, T, S]
  scores = jnp.where(visible(q_pos, k_pos, window)[:, None, None], scores, MASKED)
  if sinks is not None:
    sink_column = jnp.broadcast_to(sinks.astype(jnp.float32)[None, :, :, None, None],
                                   scores.shape[:-1] + (1,))  # [B, K, G, T, 1]
    scores = jnp.concatenate([scores, sink_column], axis=-1)
  probs = jax.nn.softmax(scores, axis=-1)
  if sinks is not None:
    probs = probs[..., :-1]  # the sink's share goes nowhere
  return jnp.einsum("bkgts,bksh->btkgh", probs.astype(v.dtype), v,
                    preferred_element_type=jnp.float32).astype(v.dtype)


def attend(q, k, v, q_pos, k_pos, *, window, sinks, impl: str = "auto", platform: str = "auto",
           in_order: bool = False):
  """`attention`, or a kernel (blocked, flash, pallas, splash) when `impl` (the execution
  config's attention_impl) picks it; `auto` chooses by platform and (query, key) pairs
  (model/choices.py).

  `in_order` promises that keys are the queries' own tokens at positions 0..T-1; the kernel then
  skips key blocks that no query of a block can see.
  """
  impl = choices.attention_impl(impl, q.shape[1], k.shape[2], in_order, platform)
  # A Pallas kernel runs compiled only on its own platform, the target's (not the backend this
  # process traces on: a program lowered here for a TPU must hold the Mosaic kernel).
  target = choices.target_platform(platform)
  if impl == "plain":
    return attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks)
  if impl == "pallas":
    return pallas_attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible,
                            in_order=in_order, interpret=target != "gpu")
  if impl == "splash":
    return splash_attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible,
                            in_order=in_order, interpret=target != "tpu")
  if impl == "flash":
    return flash_attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible,
                           in_order=in_order)
  return blocked_attention(q, k, v, q_pos, k_pos, window=window, sinks=sinks, visible=visible,
                           in_order=in_order)


def attend_with_cache(q, k, v, positions, cache: LayerCache | None, layer=None, *,
                      window: int | None, sinks: jax.Array | None, impl: str = "auto",
                      platform: str = "auto", in_order: bool = False
                      ) -> tuple[jax.Array, LayerCache | None]:
  """Attention of new tokens over themselves (no cache) or over cache + themselves.

  q [B, T, K, G, H]; k, v [B, T, K, H] for the new tokens. `in_order`: positions are 0..T-1.
  `layer`: `cache` is a stack ([L, ...]) of which this layer is entry `layer`; it is written in
  place and the whole stack returned.
  """
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, H]
  options = dict(window=window, sinks=sinks, impl=impl, platform=platform)
  if cache is None:
    return attend(q, k, v, positions, positions, in_order=in_order, **options), None
  if window is None:
    # Full layer: the cache has a slot for every position, so write first and read it whole.
    cache = cache_write(cache, k, v, positions, layer)
    view = layer_view(cache, layer)
    return attend(q, view.k, view.v, positions, view.pos, **options), cache
  # Sliding layer: the ring holds only the last `window` positions, and a multi-token write
  # would evict keys that this chunk's earlier queries still need; read ring + chunk, then write.
  view = layer_view(cache, layer)
  keys = jnp.concatenate([view.k, k.astype(view.k.dtype)], axis=2)  # [B, K, S + T, H]
  values = jnp.concatenate([view.v, v.astype(view.v.dtype)], axis=2)
  key_pos = jnp.concatenate([view.pos, positions.astype(jnp.int32)], axis=1)
  out = attend(q, keys, values, positions, key_pos, **options)
  return out, cache_write(cache, k, v, positions, layer)


class Attention(nnx.Module):
  """GPT-OSS attention block: RMSNorm, fused qkv, RoPE/YaRN, sinks, GQA, output projection."""

  def __init__(self, cfg: GptOssConfig, layer: int, *,
               execution: ExecutionConfig | None = None, rngs: nnx.Rngs):
    execution = execution or ExecutionConfig()
    self.num_heads = cfg.num_attention_heads
    self.kv_heads = cfg.num_key_value_heads
    self.head_dim = cfg.head_dim
    self.window = cfg.layer_window(layer)
    self.impl, self.platform = execution.attention_impl, execution.platform
    dtype, param_dtype = execution.compute_dtype, execution.storage_dtype
    self.norm = RMSNorm(cfg.hidden_size, param_dtype=execution.param_dtype, rngs=rngs)
    qkv_size = cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    if execution.dense_format == "int8":  # frozen int8 kernels (model/int8.py)
      dense = lambda fan_in, fan_out, logical, init: int8.Int8Linear(
          fan_in, fan_out, logical_axes=logical, dtype=dtype, param_dtype=param_dtype)
    else:
      dense = lambda fan_in, fan_out, logical, init: linear(
          fan_in, fan_out, logical_axes=logical, matmul_impl=execution.matmul_impl, dtype=dtype,
          param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    self.qkv = dense(cfg.hidden_size, qkv_size, (axes.EMBED, axes.QKV), normal_init())
    # Sinks start at 0: one extra "key" scoring like an average key, which the model can raise
    # (heads that should rest) or push towards -inf (plain softmax).
    self.sinks = nnx.Param(jnp.zeros((cfg.num_attention_heads,), param_dtype),
                           **axes.names(axes.Q_HEADS))
    self.out = dense(cfg.head_dim * cfg.num_attention_heads, cfg.hidden_size,
                     (axes.Q_HEADS, axes.EMBED), residual_init(cfg.num_hidden_layers))

  def __call__(self, x: jax.Array, positions: jax.Array, rope: tuple[jax.Array, jax.Array],
               cache: LayerCache | None = None, layer=None, *, in_order: bool = False
               ) -> tuple[jax.Array, LayerCache | None]:
    batch, length, _ = x.shape
    groups = self.num_heads // self.kv_heads
    h = self.norm(x)
    qkv = self.qkv(h)
    q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
    # LoRA adapters (model/adapters.py) update each slice of the fused matmul on its own, as
    # PEFT's q_proj, k_proj and v_proj.
    q, k, v = (adapters.add_update(self, target, h, part) for target, part in
               (("q", qkv[..., :q_size]), ("k", qkv[..., q_size:q_size + kv_size]),
                ("v", qkv[..., q_size + kv_size:])))
    # Query head n = k * G + g shares kv head k, as in the reference's view(T, K, G, H).
    q = q.reshape(batch, length, self.kv_heads, groups, self.head_dim)  # [B, T, K, G, H]
    k = k.reshape(batch, length, self.kv_heads, self.head_dim)  # [B, T, K, H]
    v = v.reshape(batch, length, self.kv_heads, self.head_dim)  # [B, T, K, H]
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    sinks = self.sinks[...].reshape(self.kv_heads, groups)  # [K, G]
    out, cache = attend_with_cache(q, k, v, positions, cache, layer, window=self.window,
                                   sinks=sinks, impl=self.impl, platform=self.platform,
                                   in_order=in_order)
    out = out.reshape(batch, length, self.num_heads * self.head_dim)  # [B, T, N * H]
    return adapters.add_update(self, "o", out, self.out(out)), cache
