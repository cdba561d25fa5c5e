"""save_pretrained: a GptOss -> the Hugging Face layout transformers loads as GptOssForCausalLM.

A model loaded with mxfp4="keep" writes its experts back as MXFP4 blocks and scales; every other
tensor is written in `dtype`. Our tokenizer's description is saved beside the weights, so a
compact-vocabulary model reloads with the ids it speaks.
"""

import json
import os
import sys

import ml_dtypes
import numpy as np
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import layer_stack
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.lora import has_lora
from nanogptoss_jax.pretrained import config_map, names, safetensors_io
from nanogptoss_jax.pretrained.layout import HUGGING_FACE, INDEX_FILE
from nanogptoss_jax.pretrained.tokenizer import save_tokenizer

EXPORT_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
MAX_SHARD_BYTES = 5_000_000_000  # Hugging Face's usual shard size


def _split_sizes(cfg: GptOssConfig, count: int) -> list[int]:
  """Row counts of the q, k, v projections that our fused qkv concatenates."""
  assert count == 3
  kv = cfg.num_key_value_heads * cfg.head_dim
  return [cfg.num_attention_heads * cfg.head_dim, kv, kv]


def hf_tensors(model, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
  """Hugging Face names -> host arrays (expert MXFP4 storage kept as uint8)."""
  cfg, out = model.cfg, {}
  table = names.float_table(HUGGING_FACE, cfg.num_hidden_layers)
  params = layer_stack.to_layout(nnx.state(model, nnx.Param), layer_stack.LOOP)
  for path, variable in nnx.to_flat_state(params):
    value = np.asarray(variable[...])
    expert = names.expert_path(path)
    if expert is not None and expert[2] != "weight":
      layer, matrix, part = expert
      out[names.mxfp4_names(HUGGING_FACE, layer, matrix)[part == "scales"]] = value
      continue
    source_names, swap = table[path]
    value = (np.swapaxes(value, -1, -2) if swap else value).astype(EXPORT_DTYPES[dtype])
    if len(source_names) == 1:
      out[source_names[0]] = np.ascontiguousarray(value)
    else:
      bounds = np.cumsum(_split_sizes(cfg, len(source_names)))[:-1]
      for name, part in zip(source_names, np.split(value, bounds, axis=0)):
        out[name] = np.ascontiguousarray(part)
  return out


def _shards(tensors: dict, max_bytes: int) -> list[dict]:
  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  return shards + [current]


def save_pretrained(model, tokenizer, out_dir: str, *, dtype: str = "bfloat16",
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
  """Writes config.json, generation_config.json, safetensors shards + index, our tokenizer."""
  if not isinstance(getattr(model, "cfg", None), GptOssConfig):
    raise UserError("save_pretrained exports GPT-OSS models only; GPT-2 runs have no Hugging "
                    "Face export here yet")
  if getattr(model, "execution", None) is not None and model.execution.dense_format != "float":
    raise UserError(f"save_pretrained: the model's embedding and attention are "
                    f"{model.execution.dense_format} (model/int8.py), which Hugging Face's "
                    f"GptOss cannot read; export the float model they were quantized from")
  if has_lora(model):
    raise UserError("save_pretrained writes base weights only: merge_lora(model) first, or "
                    "save_adapter(model, dir) for a PEFT adapter")
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"dtype={dtype!r} must be one of {sorted(EXPORT_DTYPES)}")
  cfg = model.cfg
  if cfg.vocab_size != tokenizer.vocab_size:
    raise UserError(f"the model's vocab_size {cfg.vocab_size} differs from its tokenizer's "
                    f"{tokenizer.vocab_size}")
  os.makedirs(out_dir, exist_ok=True)
  stop_ids = list(tokenizer.stop_ids)
  config = config_map.to_hugging_face(cfg, stop_ids=stop_ids, mxfp4=model.execution.expert_format == "mxfp4")
  config["torch_dtype"] = dtype
  _write_json(os.path.join(out_dir, "config.json"), config)
  _write_json(os.path.join(out_dir, "generation_config.json"),
              {"eos_token_id": stop_ids, "do_sample": True})
  shards = _shards(hf_tensors(model, dtype), max_shard_bytes)
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors_io.write(os.path.join(out_dir, file), shard, {"format": "pt"})
    weight_map |= dict.fromkeys(shard, file)
    total += sum(v.nbytes for v in shard.values())
  _write_json(os.path.join(out_dir, INDEX_FILE),
              {"metadata": {"total_size": total}, "weight_map": weight_map})
  save_tokenizer(tokenizer, out_dir)
  if cfg.vocab_size != config_map.GptOssConfig().vocab_size:
    print(f"note: exported with a compact vocabulary of {cfg.vocab_size} ids; they are our "
          f"tokenizer's ids (saved as its file beside the weights), not o200k_harmony's",
          file=sys.stderr)


def _write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
