"""LoRA's low-rank update as a module: x -> (alpha / r) * x A B, added to a frozen matmul's output.

A [.., in, r] starts small and random, B [.., r, out] at zero, so an adapted model computes
exactly its base until B trains. Leading axes stack one adapter per expert ([E]) and per scanned
layer ([L/2]); `model/lora.py` attaches them (add_lora), blocks look them up by name here.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model import axes

# Attribute names the blocks look for: attention's four projections, the experts' two matrices.
ATTENTION_TARGETS = ("q", "k", "v", "o")
EXPERT_TARGETS = ("mlp1", "mlp2")


def attribute(target: str) -> str:
  return f"lora_{target}"


class LowRank(nnx.Module):
  """One adapter: A [*lead, in, r] (uniform +-1/sqrt(in), as PEFT's kaiming init), B zeros."""

  def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float,
               logical_axes: tuple[str, str], lead: tuple[int, ...] = (),
               lead_axes: tuple[str, ...] = (), param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = scale
    bound = in_features ** -0.5
    a = jax.random.uniform(rngs.params(), (*lead, in_features, rank), param_dtype, -bound, bound)
    self.lora_a = nnx.Param(a, **axes.names(*lead_axes, logical_axes[0], axes.LORA_RANK))
    self.lora_b = nnx.Param(jnp.zeros((*lead, rank, out_features), param_dtype),
                            **axes.names(*lead_axes, axes.LORA_RANK, logical_axes[1]))

  def factors(self, dtype) -> tuple[jax.Array, jax.Array]:
    """(A, scale * B) in `dtype`: the update is their product, never formed here."""
    return (self.lora_a[...].astype(dtype),
            (self.lora_b[...] * self.scale).astype(dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = self.factors(x.dtype)
    return (x @ a) @ b  # [..., r] in between: the rank is the bottleneck


class ExpertAdapters(nnx.Module):
  """One layer's expert adapters (`lora_mlp1`, `lora_mlp2`) held apart from its block: in the
  scan layout when only some layers' experts are adapted (model/lora.py)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PickedExperts:
  """One layer's expert factors picked from the stacks of several layers' (A [n, E, in, r],
  B [n, E, r, out] per matrix, None where not adapted) at `slot`; `on` 0 makes it a layer
  without adapters (B times 0: a zero update, and zero gradients to the stacks).

  The scan layout hands a block this instead of the picked arrays: the block indexes the stacks
  itself, inside its remat, so the backward pass keeps the stacks once and not each pair's
  factors (layer_stack.ScannedBlocks)."""

  factors_of: tuple  # (A1, B1, A2, B2), unscaled
  slot: jax.Array  # [] int32
  on: jax.Array  # [] float32, 1 or 0
  scale: float = dataclasses.field(metadata=dict(static=True))

  def factors(self, dtype) -> tuple:
    a1, b1, a2, b2 = (None if x is None else x[self.slot] for x in self.factors_of)
    scaled = lambda b: None if b is None else (b * (self.scale * self.on)).astype(dtype)
    cast = lambda a: None if a is None else a.astype(dtype)
    return cast(a1), scaled(b1), cast(a2), scaled(b2)


def adapter(module: nnx.Module, target: str) -> LowRank | None:
  """`module`'s adapter for `target`, None when it has none."""
  return getattr(module, attribute(target), None)


def add_update(module: nnx.Module, target: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """y + the `target` adapter's update of x (y itself without an adapter)."""
  low_rank = adapter(module, target)
  return y if low_rank is None else y + low_rank(x).astype(y.dtype)


def expert_factors(module: nnx.Module | PickedExperts, dtype) -> tuple | None:
  """(A1 [E, D, r], sB1 [E, r, 2F], A2 [E, F, r], sB2 [E, r, D]) for the expert dispatch, None
  without expert adapters; a missing one of the two is a zero-rank pair (adds nothing)."""
  if isinstance(module, PickedExperts):
    return module.factors(dtype)
  found = [adapter(module, target) for target in EXPERT_TARGETS]
  if all(low_rank is None for low_rank in found):
    return None
  return tuple(x for low_rank in found for x in (
      low_rank.factors(dtype) if low_rank is not None else (None, None)))
