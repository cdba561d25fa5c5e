"""Logical axis names that parameters carry (as NNX sharding metadata): what each axis of a
weight means, so one table of rules (`parallel/rules.py`) can map meanings onto mesh axes.
"""

import jax
from flax import nnx

LAYERS = "layers"  # stacked layers of the scan layout
VOCAB = "vocab"
EMBED = "embed"  # the model width D
POSITIONS = "positions"  # GPT-2's learned position table
QKV = "qkv"  # the fused q, k, v output channels (heads x head dim)
Q_HEADS = "q_heads"  # query heads (x head dim, where fused)
EXPERTS = "experts"
EXPERT_MLP = "expert_mlp"  # an expert's hidden channels (2F in, F out)
MLP = "mlp"  # GPT-2's dense MLP channels
ROUTER = "router"  # router logits: one per expert, never split
NORM = "norm"  # norm scales and biases: small, never split
PACKED = "packed"  # the 16 bytes of an MXFP4 block
LORA_RANK = "lora_rank"  # a LoRA adapter's rank r: small, never split


def names(*axes: str | None) -> dict:
  """Variable metadata naming each axis (use as `nnx.Param(value, **names(...))` or a layer's
  `kernel_metadata`); never shards eagerly, the caller places the arrays."""
  return {"out_sharding": tuple(axes), "eager_sharding": False}


def axes_of(variable: nnx.Variable) -> tuple | None:
  """The logical names a Variable (or abstract Variable) carries, None if it has none."""
  metadata = variable.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if metadata.get(key) is not None:
      return tuple(metadata[key])
  return None


def stacked(variable: nnx.Variable) -> None:
  """Marks a Variable stacked along a new leading LAYERS axis (the scan layout)."""
  axes = axes_of(variable)
  if axes is not None and (not axes or axes[0] != LAYERS):
    variable.set_metadata(**names(LAYERS, *axes))


def unstacked(variable: nnx.Variable) -> None:
  """Drops a Variable's leading LAYERS name (one layer taken out of a stack)."""
  axes = axes_of(variable)
  if axes and axes[0] == LAYERS:
    variable.set_metadata(**names(*axes[1:]))


def axes_by_path(model: nnx.Module) -> dict[tuple, tuple]:
  """{parameter path: logical names} for every Variable of `model` that carries names."""
  table = {}
  for path, variable in nnx.to_flat_state(nnx.state(model)):
    axes = axes_of(variable)
    if axes is not None:
      table[tuple(path)] = axes
  return table


def check_named(model: nnx.Module) -> list[str]:
  """Paths of parameters without logical names or with a name per axis missing."""
  wrong = []
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = axes_of(variable)
    if axes is None or len(axes) != len(jax.numpy.shape(variable.get_value())):
      wrong.append(".".join(map(str, path)))
  return wrong
