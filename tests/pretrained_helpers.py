"""Test helpers (not tests): synthetic gpt-oss checkpoints in OpenAI's original layout."""

import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np

import nanogptoss_jax
from nanogptoss_jax.pretrained import safetensors_io
from tests.reference import random_value, reference_model_module

# Realistic MXFP4 exponents (gpt-oss's scales cluster around 2^-9..2^3).
SCALE_RANGE = (118, 131)
# Tiny, but every feature on: YaRN, sliding window, GQA, sinks, biases, top-2 of 4 experts.
TINY = nanogptoss_jax.GptOssConfig(
    num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=512, hidden_size=64,
    intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
    sliding_window=4, initial_context_length=256, rope_scaling_factor=2.0)


def reference_fields(cfg) -> dict:
  ModelConfig = reference_model_module().ModelConfig
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)}


def reference_shapes(cfg) -> dict[str, tuple]:
  model = reference_model_module().Transformer(reference_model_module().ModelConfig(
      **reference_fields(cfg)), device="meta")
  return {name: tuple(p.shape) for name, p in model.named_parameters()}


def write_original(path: str, cfg=TINY, seed: int = 0, files: int = 2) -> dict[str, np.ndarray]:
  """Random weights as OpenAI ships them: bf16, experts as MXFP4 blocks + scales."""
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, shape in reference_shapes(cfg).items():
    if name.endswith(("mlp1_weight", "mlp2_weight")):
      experts, out, inputs = shape
      tensors[f"{name}.blocks"] = rng.integers(0, 256, (experts, out, inputs // 32, 16),
                                               dtype=np.uint8)
      # Scales shrink with fan-in as real ones do, so activations stay O(1).
      shift = int(round(math.log2(math.sqrt(inputs))))
      low, high = SCALE_RANGE
      tensors[f"{name}.scales"] = rng.integers(low - shift, high - shift,
                                               (experts, out, inputs // 32), dtype=np.uint8)
    else:
      tensors[name] = random_value(name, shape, rng).astype(ml_dtypes.bfloat16)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(reference_fields(cfg), f)
  names = list(tensors)
  for i in range(files):
    part = {n: tensors[n] for n in names[i::files]}
    safetensors_io.write(os.path.join(path, f"model-{i}.safetensors"), part)
  return tensors
