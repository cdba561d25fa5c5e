"""The device mesh an execution config asks for: (data, fsdp) over every device of every process."""

import jax
from jax.sharding import AxisType, Mesh

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.parallel.rules import BATCH_AXES


class MeshError(UserError, ValueError):
  """The execution config's mesh does not fit the devices."""


def make_mesh(execution: ExecutionConfig, devices=None) -> Mesh:
  """A (data, fsdp) mesh: fsdp of the execution config's size, data the remaining devices."""
  devices = jax.devices() if devices is None else devices
  count, fsdp = len(devices), execution.fsdp
  if count % fsdp:
    raise MeshError(f"execution.fsdp={fsdp} must divide the number of devices ({count}); "
                    f"valid values: {[d for d in range(1, count + 1) if count % d == 0]}")
  # Auto axes: shardings propagate through the model without annotations in every layer.
  return jax.make_mesh((count // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_shards(mesh: Mesh | None) -> int:
  """Devices a batch is split over: the MoE routes within one group per device."""
  if mesh is None:
    return 1
  return mesh.shape[BATCH_AXES[0]] * mesh.shape[BATCH_AXES[1]]
