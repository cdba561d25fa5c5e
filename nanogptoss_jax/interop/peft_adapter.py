"""LoRA adapters to and from PEFT's format: `adapter_config.json` + `adapter_model.safetensors`
as `peft.PeftModel.from_pretrained(GptOssForCausalLM...)` reads and `save_pretrained` writes.

Attention adapters are PEFT's `q_proj`, `k_proj`, `v_proj`, `o_proj` (lora_A [r, in],
lora_B [out, r]); expert adapters go through `target_parameters` on transformers' GptOss
experts ([E, in, out], gate/up interleaved as ours), whose ParamWrapper keeps lora_A as
[E * r, in] (expert-major rows) and lora_B as [out, r * E] (expert-minor columns). Wrapping both
expert matrices nests the wrappers: the first target (gate_up_proj) sits under `base_layer`.
The experts of some layers only are PEFT's layer-prefixed target parameters
(`7.mlp.experts.gate_up_proj`, as OpenAI's fine-tuning recipe writes them); `all-linear` targets
attention's four projections (the router is no `nn.Linear` in transformers' GptOss).
"""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import layer_stack
from nanogptoss_jax.model.lora import LoraConfig, add_lora, has_lora, lora_filter
from nanogptoss_jax.pretrained import safetensors_io

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model.model.layers"
ATTENTION_MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
EXPERT_PARAMETERS = {"mlp1": "mlp.experts.gate_up_proj", "mlp2": "mlp.experts.down_proj"}
# PEFT settings we do not reproduce: an adapter that uses any is refused.
ALL_LINEAR = "all-linear"
# A target parameter: an expert matrix, maybe of one layer only ("7.mlp.experts.down_proj").
TARGET_PARAMETER = re.compile(r"(?:(\d+)\.)?(mlp\.experts\.\w+)")
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "lora_bias": False, "rank_pattern": {},
               "alpha_pattern": {}, "layers_to_transform": None, "modules_to_save": None,
               "trainable_token_indices": None}


class AdapterError(UserError, ValueError):
  """An adapter directory that does not fit this model or uses settings we do not support."""


def _expert_names(targets: tuple[str, ...]) -> dict[str, str]:
  """target -> the name stem PEFT gives its tensors under `mlp.experts`, by wrapping order."""
  ordered = [t for t in EXPERT_PARAMETERS if t in targets]
  return {t: "mlp.experts" + ".base_layer" * (len(ordered) - 1 - i) for i, t in enumerate(ordered)}


def _peft_names(layer: int, target: str, targets: tuple[str, ...]) -> tuple[str, str]:
  if target in ATTENTION_MODULES:
    stem = f"self_attn.{ATTENTION_MODULES[target]}"
  else:
    stem = _expert_names(targets)[target]
  return (f"{PREFIX}.{layer}.{stem}.lora_A.weight", f"{PREFIX}.{layer}.{stem}.lora_B.weight")


def _to_peft(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ours (A [.., in, r], B [.., r, out]) -> PEFT's (lora_A, lora_B)."""
  if a.ndim == 2:
    return a.T, b.T
  experts, fan_in, rank = a.shape
  return (a.transpose(0, 2, 1).reshape(experts * rank, fan_in),  # [E * r, in]
          b.transpose(2, 1, 0).reshape(b.shape[2], rank * experts))  # [out, r * E]


def _from_peft(lora_a: np.ndarray, lora_b: np.ndarray, experts: int | None):
  if experts is None:
    return lora_a.T, lora_b.T
  rank = lora_a.shape[0] // experts
  return (lora_a.reshape(experts, rank, -1).transpose(0, 2, 1),  # [E, in, r]
          lora_b.reshape(lora_b.shape[0], rank, experts).transpose(2, 1, 0))  # [E, r, out]


def _loop_adapters(model) -> dict:
  """{(layer, target, "lora_a" | "lora_b"): Variable} of the model's adapters, loop layout."""
  state = layer_stack.to_layout(nnx.state(model, lora_filter()), layer_stack.LOOP)
  return {(path[1], path[3].removeprefix("lora_"), path[4]): v
          for path, v in nnx.to_flat_state(state)}, state


def save_adapter(model, out_dir: str) -> None:
  """Writes `model`'s adapters as a PEFT LoRA adapter directory (float32)."""
  lora = getattr(model, "lora_config", None)
  if lora is None or not has_lora(model):
    raise AdapterError("save_adapter: the model has no LoRA adapters (add_lora or a LoRA run)")
  adapters, _ = _loop_adapters(model)
  tensors = {}
  for layer in range(model.cfg.num_hidden_layers):
    for target in lora.targets:
      if (layer, target, "lora_a") not in adapters:  # experts of a layer left unadapted
        continue
      a, b = (np.asarray(adapters[(layer, target, part)][...], np.float32)
              for part in ("lora_a", "lora_b"))
      for name, value in zip(_peft_names(layer, target, lora.targets), _to_peft(a, b)):
        tensors[name] = np.ascontiguousarray(value)
  os.makedirs(out_dir, exist_ok=True)
  safetensors_io.write(os.path.join(out_dir, WEIGHTS_FILE), tensors, {"format": "pt"})
  config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank,
            "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "bias": "none",
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "base_model_name_or_path": None,
            "target_modules": [ATTENTION_MODULES[t] for t in lora.targets
                               if t in ATTENTION_MODULES],
            "target_parameters": [f"{prefix}{EXPERT_PARAMETERS[t]}"
                                  for prefix in ([f"{layer}." for layer in lora.expert_layers]
                                                 or [""])
                                  for t in EXPERT_PARAMETERS if t in lora.targets],
            **UNSUPPORTED}
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2)


def read_adapter_config(path: str) -> LoraConfig:
  """The LoraConfig of a PEFT adapter directory; refuses what we cannot reproduce."""
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise AdapterError(f"{path} holds no {CONFIG_FILE}: not a PEFT adapter directory")
  config = json.load(open(config_path))
  if config.get("peft_type") != "LORA":
    raise AdapterError(f"{config_path}: peft_type {config.get('peft_type')!r}; only LORA loads")
  for key, neutral in UNSUPPORTED.items():
    if config.get(key, neutral) not in (neutral, None, {}, False):
      raise AdapterError(f"{config_path}: {key}={config[key]!r} is not supported")
  modules = config.get("target_modules") or []
  modules = [modules] if isinstance(modules, str) else list(modules)
  if modules == [ALL_LINEAR]:
    modules = list(ATTENTION_MODULES.values())
  unknown = [name for name in modules if name not in ATTENTION_MODULES.values()]
  per_layer, names = {}, []
  for name in config.get("target_parameters") or []:
    match = TARGET_PARAMETER.fullmatch(name)
    if not match or match[2] not in EXPERT_PARAMETERS.values():
      unknown.append(name)
      continue
    per_layer.setdefault(None if match[1] is None else int(match[1]), []).append(match[2])
    names.append(match[2])
  if unknown:
    raise AdapterError(f"{config_path}: targets {unknown} are not ours (we adapt "
                       f"{sorted(ATTENTION_MODULES.values())} and "
                       f"{sorted(EXPERT_PARAMETERS.values())}, maybe layer-prefixed)")
  if None in per_layer and len(per_layer) > 1:
    raise AdapterError(f"{config_path}: target_parameters mixes every layer's experts with "
                       f"some layers' ({sorted(k for k in per_layer if k is not None)})")
  if len({tuple(sorted(v)) for v in per_layer.values()}) > 1:
    raise AdapterError(f"{config_path}: target_parameters adapts different expert matrices on "
                       f"different layers; we adapt the same ones on every chosen layer")
  if None in per_layer and per_layer[None] != [p for p in EXPERT_PARAMETERS.values()
                                               if p in per_layer[None]]:
    raise AdapterError(f"{config_path}: target_parameters must list gate_up_proj before "
                       f"down_proj (got {per_layer[None]})")
  targets = tuple(t for t in ("q", "k", "v", "o", "mlp1", "mlp2")
                  if ATTENTION_MODULES.get(t) in modules or EXPERT_PARAMETERS.get(t) in names)
  return LoraConfig(rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=targets,
                    dropout=float(config.get("lora_dropout", 0.0)),
                    expert_layers=tuple(sorted(k for k in per_layer if k is not None)))


def load_adapter(model, path: str):
  """`model` with the PEFT adapter at `path`: adds adapters (or overwrites ones of the same
  rank, alpha and targets) and fills them; returns the model."""
  lora = read_adapter_config(path)
  if has_lora(model):
    if getattr(model, "lora_config", None) != lora:
      raise AdapterError(f"the model has adapters {getattr(model, 'lora_config', None)}; the "
                         f"adapter at {path} is {lora} (merge_lora first, or load into the base)")
  else:
    add_lora(model, lora)
  weights = safetensors_io.SafetensorsFile(os.path.join(path, WEIGHTS_FILE))
  adapters, state = _loop_adapters(model)
  expected = set()
  for (layer, target, part), variable in adapters.items():
    names = _peft_names(layer, target, lora.targets)
    expected.update(names)
    if names[0] not in weights.header or names[1] not in weights.header:
      raise AdapterError(f"{path}: {names[0]} is missing (an adapter for another model?)")
    experts = model.cfg.num_experts if target in EXPERT_PARAMETERS else None
    a, b = _from_peft(np.asarray(weights.get(names[0]), np.float32),
                      np.asarray(weights.get(names[1]), np.float32), experts)
    value = a if part == "lora_a" else b
    if value.shape != variable.shape:
      raise AdapterError(f"{path}: {names[part == 'lora_b']} gives shape {value.shape}, the "
                         f"model needs {tuple(variable.shape)} (an adapter for another base?)")
    variable.set_value(jnp.asarray(value, variable.get_value().dtype))
  extra = sorted(set(weights.names()) - expected)
  if extra:
    raise AdapterError(f"{path}: {len(extra)} tensors fit no adapter of this model, e.g. "
                       f"{extra[0]} (an adapter for a deeper model?)")
  nnx.update(model, layer_stack.to_layout(state, _layout(model)))
  return model


def _layout(model) -> str:
  return layer_stack.tree_layout(nnx.state(model, lora_filter())) or layer_stack.LOOP
