"""Where the MoE's experts run on a device mesh: which of kernels/expert_parallel.py's two ways
applies, read from the mesh the program is traced under (`jax.set_mesh`; none: one device).

- "exchange": the batch is split over every batch axis (one MoE group per device) and the mesh
  has an expert axis: tokens go to their experts' devices and back (`all_to_all`).
- "replicate": one group (every device holds the same tokens: decode, prefill) and the experts
  split over the expert and/or tensor axes: each device runs its own, a `psum` adds them.
"""

import math

import jax
from flax import nnx

from nanogptoss_jax.kernels import expert_parallel
from nanogptoss_jax.model.execution import BATCH_AXES, EXPERT, TENSOR

EXCHANGE, REPLICATE = "exchange", "replicate"


def _shape(mesh) -> dict[str, int]:
  return {} if mesh is None or mesh.empty else dict(mesh.shape)


def expert_mode(mesh, groups: int, num_experts: int) -> tuple[str, tuple[str, ...]] | None:
  """(EXCHANGE or REPLICATE, the mesh axes splitting the experts), or None: no expert split."""
  shape = _shape(mesh)
  batch = math.prod(shape.get(axis, 1) for axis in BATCH_AXES)
  experts = shape.get(EXPERT, 1)
  if experts > 1 and groups == batch and num_experts % experts == 0:
    return EXCHANGE, (EXPERT,)
  split = tuple(axis for axis in (EXPERT, TENSOR) if shape.get(axis, 1) > 1)
  if split and groups == 1 and num_experts % math.prod(shape[a] for a in split) == 0:
    return REPLICATE, split
  return None


def parallel_experts(mode, moe: nnx.Module, t, top_experts, top_weights, options: dict,
                     layer=None):
  """The MoE's expert outputs [P, M, D] float32 (and dropped assignments [P], or None) for
  tokens t [P, M, D] routed to top_experts / top_weights [P, M, C]; `layer` as MoE's."""
  kind, axes = mode
  weights = moe.expert_weights("dense", t.shape[1], layer)  # float matrices, split on E as stored
  compute = dict(activation=options["activation"],
                 matmul=options.get("matmul", jax.numpy.matmul))
  if kind == EXCHANGE:
    mesh = _shape(jax.sharding.get_abstract_mesh())
    return expert_parallel.exchanged_experts(
        t, top_experts, top_weights, weights, **compute,
        batch_axes=tuple(axis for axis in BATCH_AXES if axis in mesh), expert_axis=axes[0],
        capacity_factor=moe.execution.expert_capacity)
  return expert_parallel.replicated_experts(t, top_experts, top_weights, weights, **compute,
                                            expert_axes=axes), None
