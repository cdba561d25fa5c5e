"""Parameter counts of a model, real or abstract (`nnx.eval_shape`)."""

import math

from flax import nnx


def param_size(variable) -> int:
  # Shapes only, so an abstract model (ShapeDtypeStruct leaves) counts without being allocated.
  return math.prod(variable.shape)


def count_params(model: nnx.Module) -> int:
  """Number of scalars held in the model's nnx.Param variables."""
  return sum(param_size(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
