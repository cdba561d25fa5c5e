"""config.json of either published layout -> GptOssConfig, and ours -> Hugging Face's.

Settings we do not implement are refused with the field named, never silently ignored.
"""

import dataclasses

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.layers import RMS_NORM_EPS
from nanogptoss_jax.model.moe import SWIGLU_ALPHA
from nanogptoss_jax.pretrained.safetensors_io import CheckpointError

# The reference ModelConfig's fields (the original layout's config.json) are ours by name.
REFERENCE_FIELDS = ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                    "hidden_size", "intermediate_size", "swiglu_limit", "head_dim",
                    "num_attention_heads", "num_key_value_heads", "sliding_window",
                    "initial_context_length", "rope_theta", "rope_scaling_factor",
                    "rope_ntk_alpha", "rope_ntk_beta")
# Hugging Face name -> ours, where only the name differs.
HF_RENAMES = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}
HF_SAME = ("num_hidden_layers", "vocab_size", "hidden_size", "intermediate_size", "head_dim",
           "num_attention_heads", "num_key_value_heads", "sliding_window", "swiglu_limit")
SLIDING, FULL = "sliding_attention", "full_attention"


def _refuse(field: str, value, why: str):
  raise CheckpointError(f"config.json: {field}={value!r} is not supported: {why}")


def from_original(config: dict) -> dict:
  unknown = sorted(set(config) - set(REFERENCE_FIELDS))
  if unknown:
    _refuse(unknown[0], config[unknown[0]], "not a field of the reference ModelConfig")
  return dict(config)


def _check_hf(config: dict) -> None:
  checks = [
      ("rms_norm_eps", lambda v: abs(v - RMS_NORM_EPS) < 1e-12, f"our RMSNorm uses {RMS_NORM_EPS}"),
      ("tie_word_embeddings", lambda v: not v, "GPT-OSS has an untied unembedding"),
      ("attention_bias", lambda v: v, "GPT-OSS attention has biases"),
      ("hidden_act", lambda v: v == "silu", "the experts are a clamped SwiGLU"),
      ("swiglu_alpha", lambda v: abs(v - SWIGLU_ALPHA) < 1e-9, f"we use {SWIGLU_ALPHA}"),
  ]
  for field, ok, why in checks:
    if field in config and not ok(config[field]):
      _refuse(field, config[field], why)
  layers = config.get("layer_types")
  if layers is not None:
    want = [SLIDING if i % 2 == 0 else FULL for i in range(config["num_hidden_layers"])]
    if list(layers) != want:
      _refuse("layer_types", layers, "we alternate sliding (even) and full (odd) layers")


def _rope(config: dict) -> dict:
  rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
  theta = rope.get("rope_theta", config.get("rope_theta"))
  out = {} if theta is None else {"rope_theta": float(theta)}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return out | {"rope_scaling_factor": 1.0}
  if kind != "yarn":
    _refuse("rope_scaling.rope_type", kind, "only yarn and default RoPE are implemented")
  if rope.get("truncate", True):
    _refuse("rope_scaling.truncate", rope.get("truncate", True),
            "GPT-OSS's YaRN ramp is not truncated (set truncate: false)")
  for field in ("attention_factor", "mscale", "mscale_all_dim"):
    if rope.get(field) is not None:
      _refuse(f"rope_scaling.{field}", rope[field], "we use YaRN's 0.1 ln(factor) + 1")
  return out | {"rope_scaling_factor": float(rope["factor"]),
                "rope_ntk_beta": float(rope.get("beta_fast") or 32.0),
                "rope_ntk_alpha": float(rope.get("beta_slow") or 1.0),
                "initial_context_length": int(rope["original_max_position_embeddings"])}


def from_hugging_face(config: dict) -> dict:
  _check_hf(config)
  fields = {ours: config[theirs] for theirs, ours in HF_RENAMES.items() if theirs in config}
  fields |= {name: config[name] for name in HF_SAME if name in config}
  if fields.get("sliding_window") is None:
    _refuse("sliding_window", None, "GPT-OSS's even layers slide")
  return fields | _rope(config)


def to_config(fields: dict, **ours) -> GptOssConfig:
  """GptOssConfig from mapped fields plus ours (dtypes, formats); its checks name the field."""
  known = {f.name for f in dataclasses.fields(GptOssConfig)}
  return GptOssConfig(**{k: v for k, v in fields.items() if k in known}, **ours)


def to_hugging_face(cfg: GptOssConfig, *, stop_ids=(), mxfp4: bool = False) -> dict:
  """The config.json transformers' GptOssForCausalLM reads back as this model."""
  if cfg.rope_scaling_factor > 1:
    rope = {"rope_type": "yarn", "factor": cfg.rope_scaling_factor,
            "beta_fast": cfg.rope_ntk_beta, "beta_slow": cfg.rope_ntk_alpha, "truncate": False,
            "original_max_position_embeddings": cfg.initial_context_length}
  else:
    rope = {"rope_type": "default"}
  out = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
         "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.experts_per_token,
         **{name: getattr(cfg, name) for name in HF_SAME},
         "rope_theta": cfg.rope_theta, "rope_parameters": rope | {"rope_theta": cfg.rope_theta},
         "layer_types": [SLIDING if i % 2 == 0 else FULL for i in range(cfg.num_hidden_layers)],
         "max_position_embeddings": cfg.max_positions, "rms_norm_eps": RMS_NORM_EPS,
         "tie_word_embeddings": False, "attention_bias": True, "hidden_act": "silu",
         "swiglu_alpha": SWIGLU_ALPHA, "torch_dtype": "bfloat16",
         "eos_token_id": list(stop_ids) or None}
  if mxfp4:
    out["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
  return out
