"""Joining a multi-host run, and batches placed over the mesh's (data, fsdp) axes (the mesh and
the parameters' placement: parallel/)."""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nanogptoss_jax.parallel.rules import BATCH_AXES

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


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assembles each process's rows into one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(sharding, local)
