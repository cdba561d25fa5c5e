"""Folding LoRA adapters into the weights: W + (alpha / r) A B, then the adapters are gone.

Float weights take the update in float32 and keep their dtype. MXFP4 experts are decoded,
updated and quantized again with OpenAI's rule (model/mxfp4.quantize); that rounding is the
merge's cost, which `merge_cost` measures (max |Δlogit| and KL on a batch).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model import adapters, mxfp4
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.lora import _block_groups, has_lora
from nanogptoss_jax.model.quantize import quantization_error


def _delta(low_rank: adapters.LowRank) -> jax.Array:
  """The update the adapter adds, [.., in, out] in float32."""
  return low_rank.scale * jnp.matmul(low_rank.lora_a[...].astype(jnp.float32),
                                     low_rank.lora_b[...].astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST)


def _add(param: nnx.Param, delta: jax.Array, columns: slice = slice(None)) -> None:
  value = param[...]
  param.set_value(value.at[..., columns].add(delta).astype(value.dtype)
                  if columns != slice(None) else (value.astype(jnp.float32) + delta)
                  .astype(value.dtype))


def _add_mxfp4(blocks: nnx.Param, scales: nnx.Param, delta: jax.Array) -> None:
  """Blocks and scales of [.., E, out, in] re-quantized after adding delta [.., E, in, out]."""
  weight = mxfp4.decode(blocks[...], scales[...], jnp.float32)  # [.., E, out, in]
  new_blocks, new_scales = mxfp4.quantize(weight + jnp.swapaxes(delta, -1, -2))
  blocks.set_value(new_blocks)
  scales.set_value(new_scales)


def merge_lora(model: GptOss) -> GptOss:
  """A copy of `model` with every adapter folded into the weight it adapts and removed."""
  if not has_lora(model):
    raise ConfigError("merge_lora: the model has no LoRA adapters")
  merged = nnx.clone(model)
  cfg = merged.cfg
  q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  columns = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
  for block, _ in _block_groups(merged):
    for target in adapters.ATTENTION_TARGETS + adapters.EXPERT_TARGETS:
      low_rank = adapters.adapter(block.attn if target in columns or target == "o" else block.mlp,
                                  target)
      if low_rank is None:
        continue
      delta = _delta(low_rank)
      if target in columns:
        _add(block.attn.qkv.kernel, delta, columns[target])
        delattr(block.attn, adapters.attribute(target))
      elif target == "o":
        _add(block.attn.out.kernel, delta)
        delattr(block.attn, adapters.attribute(target))
      else:
        if merged.execution.expert_format == "mxfp4":
          _add_mxfp4(getattr(block.mlp, f"{target}_blocks"), getattr(block.mlp, f"{target}_scales"),
                     delta)
        else:
          _add(getattr(block.mlp, f"{target}_weight"), delta)
        delattr(block.mlp, adapters.attribute(target))
  del merged.lora_config
  return merged


def merge_cost(model: GptOss, merged: GptOss, tokens: jax.Array) -> dict:
  """What merging cost on `tokens` [B, T] (nothing but rounding for float weights; MXFP4's
  re-quantization otherwise): max |Δlogit| and mean KL(adapted || merged), in nats."""
  return quantization_error(model, merged, tokens)
