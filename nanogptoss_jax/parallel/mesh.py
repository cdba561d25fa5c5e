"""The device mesh an execution config asks for: (data, fsdp, expert, tensor) over every device
of every process."""

import contextlib
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.parallel.rules import BATCH_AXES, MESH_AXES


class MeshError(UserError, ValueError):
  """The execution config's mesh does not fit the devices."""


def make_mesh(execution: ExecutionConfig, devices=None) -> Mesh:
  """A (data, fsdp, expert, tensor) mesh: fsdp, expert and tensor of the execution config's
  sizes, data the remaining devices."""
  devices = jax.devices() if devices is None else devices
  count = len(devices)
  split = execution.fsdp * execution.expert * execution.tensor
  if count % split:
    raise MeshError(f"execution.fsdp={execution.fsdp} x expert={execution.expert} x tensor="
                    f"{execution.tensor} = {split} must divide the number of devices ({count})")
  shape = (count // split, execution.fsdp, execution.expert, execution.tensor)
  # Auto axes: shardings propagate through the model without annotations in every layer.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_shards(mesh: Mesh | None) -> int:
  """Devices a batch is split over: the MoE routes within one group per device."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape.get(axis, 1) for axis in BATCH_AXES)


def mesh_of(tree) -> Mesh | None:
  """The mesh the arrays of `tree` (a model's state) are placed on; None for one device."""
  for leaf in jax.tree.leaves(tree):
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
      return sharding.mesh
  return None


def traced_on(tree):
  """A context to call a jitted program over `tree` in: it is traced under the arrays' mesh,
  which the MoE reads to run its experts where they lie (model/expert_parallel.py)."""
  mesh = mesh_of(tree)
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
