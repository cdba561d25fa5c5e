"""One sharding policy: a table of rules maps the logical axes that parameters carry
(model/axes.py) onto mesh axes. The trainer, the loaders and the serving engine all place
weights through `param_spec`, so a model gets one layout whoever builds it.
"""

from collections.abc import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanogptoss_jax.model import axes

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)  # a batch's leading axis is split over both

# Logical axis -> the mesh axes that may split it. FSDP (ZeRO-3) splits one large axis of every
# weight; stacked layers are never split (a scan visits them one at a time), nor are norms,
# router logits or MXFP4's packed bytes.
RULES: Mapping[str, tuple[str, ...]] = {
    axes.VOCAB: (FSDP,),
    axes.EMBED: (FSDP,),
    axes.POSITIONS: (FSDP,),
    axes.QKV: (FSDP,),
    axes.Q_HEADS: (FSDP,),
    axes.EXPERTS: (FSDP,),
    axes.EXPERT_MLP: (FSDP,),
    axes.MLP: (FSDP,),
    axes.LAYERS: (),
    axes.ROUTER: (),
    axes.NORM: (),
    axes.PACKED: (),
    axes.LORA_RANK: (),
}


def param_spec(logical: tuple, shape: tuple[int, ...], mesh_shape: Mapping[str, int]) -> P:
  """The PartitionSpec of one array: each mesh axis (size > 1) splits the largest array axis
  whose logical name the rules let it split and whose length it divides; one mesh axis per
  array axis, each at most once."""
  spec = [None] * len(shape)
  for mesh_axis, size in mesh_shape.items():
    if size == 1:
      continue
    candidates = [i for i, name in enumerate(logical)
                  if spec[i] is None and mesh_axis in RULES.get(name, ()) and shape[i] % size == 0]
    if candidates:
      spec[max(candidates, key=lambda i: (shape[i], -i))] = mesh_axis
  return P(*spec)


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
