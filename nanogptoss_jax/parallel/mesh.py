"""The device mesh an execution config asks for: (data, fsdp, expert, tensor) over every device
of every process."""

import math

import jax
from jax.sharding import AxisType, Mesh

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
