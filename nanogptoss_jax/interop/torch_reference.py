"""Weights to and from OpenAI's reference `Transformer.state_dict()` naming and layouts.

The reference stores linear weights as [out, in] and expert weights as [E, out, in]; we store
[in, out] and [E, in, out]. The table below is the whole mapping: our parameter path (with
`{i}` for the layer), the reference name, and whether the last two axes swap.
"""

import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model import layer_stack
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss, abstract_loop_model, from_loop_flat_state

MAX_NAMES_SHOWN = 8  # of the missing, unexpected or misshapen tensors a mismatch error lists
# (our path, reference name, transpose last two axes)
GLOBAL_PARAMS = [
    ("embedding.embedding", "embedding.weight", False),
    ("norm.scale", "norm.scale", False),
    ("unembedding.kernel", "unembedding.weight", True),
]
LAYER_PARAMS = [
    ("attn.norm.scale", "attn.norm.scale", False),
    ("attn.qkv.kernel", "attn.qkv.weight", True),
    ("attn.qkv.bias", "attn.qkv.bias", False),
    ("attn.sinks", "attn.sinks", False),
    ("attn.out.kernel", "attn.out.weight", True),
    ("attn.out.bias", "attn.out.bias", False),
    ("mlp.norm.scale", "mlp.norm.scale", False),
    ("mlp.router.kernel", "mlp.gate.weight", True),
    ("mlp.router.bias", "mlp.gate.bias", False),
    ("mlp.mlp1_weight", "mlp.mlp1_weight", True),
    ("mlp.mlp1_bias", "mlp.mlp1_bias", False),
    ("mlp.mlp2_weight", "mlp.mlp2_weight", True),
    ("mlp.mlp2_bias", "mlp.mlp2_bias", False),
]


def param_table(num_layers: int) -> dict[tuple, tuple[str, bool]]:
  """Our parameter path (as a tuple) -> (reference name, transpose)."""
  table = {tuple(ours.split(".")): (theirs, swap) for ours, theirs, swap in GLOBAL_PARAMS}
  for i in range(num_layers):
    for ours, theirs, swap in LAYER_PARAMS:
      table[("blocks", i, *ours.split("."))] = (f"block.{i}.{theirs}", swap)
  return table


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so go through float32
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _swap(array: np.ndarray, swap: bool) -> np.ndarray:
  return np.swapaxes(array, -1, -2) if swap else array


def from_torch_state_dict(config: GptOssConfig, state_dict,
                          execution: ExecutionConfig | None = None) -> GptOss:
  """Builds a GptOss from the reference's state_dict (torch tensors or numpy, any float dtype).

  Only the parameters the reference has are read; any other (an adapter added by the execution
  or a caller) keeps its initial value."""
  execution = execution or ExecutionConfig()
  state = nnx.state(abstract_loop_model(config, execution))
  table = param_table(config.num_hidden_layers)
  flat = dict(nnx.to_flat_state(state))
  missing = sorted(name for name, _ in table.values() if name not in state_dict)
  unexpected = sorted(set(state_dict) - {name for name, _ in table.values()})
  if missing or unexpected:
    hint = ""
    prefix = os.path.commonprefix(unexpected)
    if missing and prefix and all(prefix + name in state_dict for name in missing):
      hint = f"; every key starts with {prefix!r}: strip that prefix first"
    raise KeyError(f"state_dict does not match the config: {len(missing)} missing "
                   f"{missing[:MAX_NAMES_SHOWN]}, {len(unexpected)} unexpected "
                   f"{unexpected[:MAX_NAMES_SHOWN]}{hint}")
  param_dtype = execution.storage_dtype
  wrong = []
  for path, variable in flat.items():
    if path not in table:
      raise KeyError(f"{'.'.join(map(str, path))} has no counterpart in the reference's "
                     "state_dict; build the base model first, then add adapters to it")
    name, swap = table[path]
    value = _swap(_to_numpy(state_dict[name]), swap)
    if value.shape != variable.shape:
      stored = (*value.shape[:-2], value.shape[-1], value.shape[-2])  # before _swap
      saved = f"{stored} transposed to " if swap else ""
      wrong.append(f"{name}: {saved}{value.shape}, the config needs {variable.shape}")
      continue
    variable.set_value(jnp.asarray(value, param_dtype))
  if wrong:
    raise ValueError(f"{len(wrong)} tensors do not match the config's shapes:\n  "
                     + "\n  ".join(wrong[:MAX_NAMES_SHOWN]))
  return from_loop_flat_state(config, execution, flat)


def to_torch_state_dict(model: GptOss) -> dict[str, np.ndarray]:
  """The inverse of from_torch_state_dict: reference names and layouts, float32 numpy arrays."""
  table = param_table(model.cfg.num_hidden_layers)
  out = {}
  params = layer_stack.to_layout(nnx.state(model, nnx.Param), layer_stack.LOOP)
  for path, variable in nnx.to_flat_state(params):
    name, swap = table[path]
    out[name] = np.ascontiguousarray(_swap(np.asarray(variable[...], dtype=np.float32), swap))
  return out
