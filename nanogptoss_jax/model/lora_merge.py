"""Folding LoRA adapters into the weights: W + (alpha / r) A B, then the adapters are gone.

Float weights take the update in float32 and keep their dtype. MXFP4 experts are decoded,
updated and quantized again with OpenAI's rule (model/mxfp4.quantize), int8 attention kernels
with theirs (model/int8.quantize); that rounding is the merge's cost, which `merge_cost`
measures (max |Δlogit| and KL on a batch).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model import adapters, int8, mxfp4
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.layer_stack import LORA_EXPERTS
from nanogptoss_jax.model.lora import _block_groups, has_lora
from nanogptoss_jax.model.quantize import quantization_error


def _delta(low_rank: adapters.LowRank) -> jax.Array:
  """The update the adapter adds, [.., in, out] in float32."""
  return low_rank.scale * jnp.matmul(low_rank.lora_a[...].astype(jnp.float32),
                                     low_rank.lora_b[...].astype(jnp.float32),
                                     precision=jax.lax.Precision.HIGHEST)


def _add(param: nnx.Param, delta: jax.Array, columns: slice = slice(None),
         at: int | None = None) -> None:
  """param += delta, on `columns` of its last axis, at entry `at` of its leading axis if given."""
  whole = param[...]
  value = whole if at is None else whole[at]
  if columns != slice(None):
    value = value.at[..., columns].add(delta).astype(value.dtype)
  else:
    value = (value.astype(jnp.float32) + delta).astype(value.dtype)
  param.set_value(value if at is None else whole.at[at].set(value))


def _add_mxfp4(blocks: nnx.Param, scales: nnx.Param, delta: jax.Array,
               at: int | None = None) -> None:
  """Blocks and scales of [.., E, out, in] re-quantized after adding delta [.., E, in, out] (at
  entry `at` of their leading axis if given)."""
  pick = (lambda x: x) if at is None else (lambda x: x[at])
  weight = mxfp4.decode(pick(blocks[...]), pick(scales[...]), jnp.float32)  # [.., E, out, in]
  new_blocks, new_scales = mxfp4.quantize(weight + jnp.swapaxes(delta, -1, -2))
  for param, new in ((blocks, new_blocks), (scales, new_scales)):
    param.set_value(new if at is None else param[...].at[at].set(new))


def _add_int8(dense: int8.Int8Linear, delta: jax.Array, columns: slice) -> None:
  """An int8 kernel [.., in, out] decoded, delta added on `columns`, quantized again (columns
  left alone quantize back to the same values: their largest value sets the same scale)."""
  weight = int8.dequantize(dense.kernel[...], dense.kernel_scale[...], -2)
  values, scales = int8.quantize(weight.at[..., columns].add(delta), -2)
  dense.kernel.set_value(values)
  dense.kernel_scale.set_value(scales)


def _add_expert(model: GptOss, mlp: nnx.Module, target: str, delta: jax.Array,
                at: int | None = None) -> None:
  if model.execution.expert_format == "mxfp4":
    _add_mxfp4(getattr(mlp, f"{target}_blocks"), getattr(mlp, f"{target}_scales"), delta, at)
  else:
    _add(getattr(mlp, f"{target}_weight"), delta, at=at)


def merge_lora(model: GptOss) -> GptOss:
  """A copy of `model` with every adapter folded into the weight it adapts and removed."""
  if not has_lora(model):
    raise ConfigError("merge_lora: the model has no LoRA adapters")
  merged = nnx.clone(model)
  cfg = merged.cfg
  q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  columns = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
  for block, _, _ in _block_groups(merged):
    for target in adapters.ATTENTION_TARGETS + adapters.EXPERT_TARGETS:
      low_rank = adapters.adapter(block.attn if target in columns or target == "o" else block.mlp,
                                  target)
      if low_rank is None:
        continue
      delta = _delta(low_rank)
      if target in columns or target == "o":
        dense = block.attn.qkv if target in columns else block.attn.out
        if isinstance(dense, int8.Int8Linear):
          _add_int8(dense, delta, columns.get(target, slice(None)))
        else:
          _add(dense.kernel, delta, columns.get(target, slice(None)))
        delattr(block.attn, adapters.attribute(target))
      else:
        _add_expert(merged, block.mlp, target, delta)
        delattr(block.mlp, adapters.attribute(target))
  held = getattr(merged.blocks, LORA_EXPERTS, None)
  for key, owner in (held or {}).items():  # the scan layout's adapters of some layers' experts
    block, at = merged.blocks.stacked(int(key))
    for target in adapters.EXPERT_TARGETS:
      low_rank = adapters.adapter(owner, target)
      if low_rank is not None:
        _add_expert(merged, block.mlp, target, _delta(low_rank), at)
  if held is not None:
    setattr(merged.blocks, LORA_EXPERTS, None)
  del merged.lora_config
  return merged


def merge_cost(model: GptOss, merged: GptOss, tokens: jax.Array) -> dict:
  """What merging cost on `tokens` [B, T] (nothing but rounding for float weights; MXFP4's
  re-quantization otherwise): max |Δlogit| and mean KL(adapted || merged), in nats."""
  return quantization_error(model, merged, tokens)
