"""One sharding policy: a table of rules maps the logical axes that parameters carry
(model/axes.py) onto mesh axes. The trainer, the loaders and the serving engine all place
weights through `param_spec`, so a model gets one layout whoever builds it.
"""

import math
from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanogptoss_jax.model import axes
from nanogptoss_jax.model.execution import BATCH_AXES, DATA, EXPERT, FSDP, MESH_AXES, TENSOR

__all__ = ["BATCH_AXES", "DATA", "EXPERT", "FSDP", "MESH_AXES", "TENSOR", "RULES", "param_spec"]

# Logical axis -> the mesh axes that may split it. FSDP (ZeRO-3) splits one large axis of every
# weight; EXPERT splits the experts (the MoE then sends tokens to them); TENSOR splits attention
# heads, the vocabulary and the experts, so an inference mesh leaves no weight whole on any
# device and a decode step gathers none. Stacked layers are never split (a scan visits them one
# at a time), nor are norms, router logits or MXFP4's packed bytes.
RULES: Mapping[str, tuple[str, ...]] = {
    axes.VOCAB: (TENSOR, FSDP),
    axes.EMBED: (FSDP,),
    axes.POSITIONS: (FSDP,),
    axes.QKV: (TENSOR, FSDP),
    axes.Q_HEADS: (TENSOR, FSDP),
    axes.EXPERTS: (EXPERT, TENSOR),
    axes.EXPERT_MLP: (FSDP,),
    axes.MLP: (FSDP,),
    axes.LAYERS: (),
    axes.ROUTER: (),
    axes.NORM: (),
    axes.PACKED: (),
    axes.LORA_RANK: (),
}


# The order mesh axes choose in: the experts' and heads' own axes before fsdp's largest-axis rule.
PRIORITY = (EXPERT, TENSOR, FSDP, DATA)


def param_spec(logical: tuple, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> P:
  """The PartitionSpec of one array: each mesh axis (size > 1, in PRIORITY order) splits the
  largest array axis not yet split whose logical name the rules let it split and whose length
  it divides; with none left, it joins an axis already split if it divides the rest (experts
  over expert x tensor). Each mesh axis at most once."""
  spec: list[tuple[str, ...]] = [()] * len(shape)
  order = sorted(mesh_shape, key=lambda a: PRIORITY.index(a) if a in PRIORITY else len(PRIORITY))
  for mesh_axis in order:
    size = mesh_shape[mesh_axis]
    if size == 1:
      continue
    split = [math.prod(mesh_shape[a] for a in spec[i]) for i in range(len(shape))]
    allowed = [i for i, name in enumerate(logical)
               if mesh_axis in RULES.get(name, ()) and shape[i] % (split[i] * size) == 0]
    candidates = [i for i in allowed if not spec[i]] or allowed
    if candidates:
      best = max(candidates, key=lambda i: (shape[i], -i))
      spec[best] = (*spec[best], mesh_axis)
  return P(*(None if not axes_ else axes_[0] if len(axes_) == 1 else axes_ for axes_ in spec))


def _names(path) -> tuple:
  return tuple(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path)


def _logical_for(path: tuple, table: Mapping[tuple, tuple]) -> tuple | None:
  """The logical names of the parameter whose path ends `path` (an optimiser moment's path is
  the parameter's behind the optimiser's own keys), None for anything else."""
  for start in range(len(path)):
    for end in (len(path), len(path) - 1):  # some trees end in the Variable's value key
      if path[start:end] in table:
        return table[path[start:end]]
  return None


def tree_shardings(mesh: Mesh, tree, table: Mapping[tuple, tuple]):
  """A NamedSharding for every array leaf of `tree` (params, optimiser state, a whole train
  state, abstract or not): a parameter's (or its moments') by its logical names in `table`
  (model/axes.axes_by_path), replicated for anything else (step counters, RNG keys)."""
  mesh_shape = dict(mesh.shape)

  def sharding(path, leaf):
    logical = _logical_for(_names(path), table)
    shape = tuple(getattr(leaf, "shape", ()))
    if logical is None or len(logical) != len(shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, param_spec(logical, shape, mesh_shape))

  return jax.tree_util.tree_map_with_path(sharding, tree)


def model_shardings(mesh: Mesh, model, tree=None):
  """`tree_shardings` of `tree` (default: the model's state) by `model`'s own logical names."""
  return tree_shardings(mesh, nnx.state(model) if tree is None else tree,
                        axes.axes_by_path(model))


def device_bytes(model, mesh_shape: Mapping[str, int]) -> int:
  """Bytes of `model`'s parameters (abstract or not) that one device holds under the rules on a
  mesh of `mesh_shape` (the largest share: every device holds the same here)."""
  table, total = axes.axes_by_path(model), 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = variable.get_value()
    shape, logical = tuple(value.shape), table.get(tuple(path))
    spec = param_spec(logical, shape, mesh_shape) if logical else P()
    parts = math.prod(math.prod(mesh_shape[a] for a in ((s,) if isinstance(s, str) else s))
                      for s in spec if s is not None)
    total += math.prod(shape) * value.dtype.itemsize // parts
  return total
