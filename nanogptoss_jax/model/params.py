"""Parameter counts of a model, real or abstract (`nnx.eval_shape`)."""

import math

import numpy as np
from flax import nnx


def param_size(variable) -> int:
  # Shapes only, so an abstract model (ShapeDtypeStruct leaves) counts without being allocated.
  return math.prod(variable.shape)


def count_params(model: nnx.Module) -> int:
  """Number of scalars held in the model's nnx.Param variables."""
  return sum(param_size(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def param_bytes(variable) -> int:
  """Bytes one variable takes as stored (real or abstract)."""
  return param_size(variable) * np.dtype(variable.dtype).itemsize


def count_bytes(model: nnx.Module) -> int:
  """Bytes of the model's nnx.Param variables as stored (int8 and MXFP4 storage as they are)."""
  return sum(param_bytes(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
