"""Device mesh and shardings: batch over (data, fsdp), parameters and optimiser state over fsdp."""

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanogptoss_jax.model import layer_stack

BATCH_AXES = ("data", "fsdp")
# Environment variables that describe a multi-process cluster to `jax.distributed.initialize`
# (which also auto-detects SLURM, Open MPI and TPU pods on its own).
CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def maybe_initialize_distributed() -> None:
  """Joins the multi-host runtime when the environment describes a cluster; no-op otherwise.

  On SLURM, Open MPI and TPU pods JAX finds everything itself. Elsewhere set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  """
  if not any(name in os.environ for name in CLUSTER_ENV) or jax.distributed.is_initialized():
    return
  count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
  jax.distributed.initialize(num_processes=int(count) if count else None,
                             process_id=int(index) if index else None)


def make_mesh(fsdp: int) -> Mesh:
  """A (data, fsdp) mesh over every device of every process."""
  count = jax.device_count()
  if fsdp < 1 or count % fsdp:
    raise ValueError(f"train.fsdp={fsdp} must divide the number of devices ({count}); "
                     f"valid values: {[d for d in range(1, count + 1) if count % d == 0]}")
  # Auto axes: shardings propagate through the model without annotations in every layer.
  return jax.make_mesh((count // fsdp, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, *, stacked: bool = False) -> P:
  """Shards the largest axis that fsdp divides (ZeRO-3 style); replicates small leaves.

  `stacked`: axis 0 counts layers that a scan visits one at a time, so it is never split."""
  if fsdp == 1 or not shape:
    return P()
  candidates = [axis for axis in np.argsort(shape)[::-1]
                if shape[axis] % fsdp == 0 and not (stacked and axis == 0)]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[candidates[0]] = "fsdp"
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_state):
  """A NamedSharding for every array leaf of an (abstract) state pytree."""
  fsdp = mesh.shape["fsdp"]

  def sharding(path, leaf):
    stacked = any(getattr(key, "key", None) == layer_stack.PAIRS for key in path)
    return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp, stacked=stacked))

  return jax.tree_util.tree_map_with_path(sharding, abstract_state)


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(sharding, local)
