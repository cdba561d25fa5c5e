"""The train state (everything a step changes) and its abstract twin for restoring checkpoints."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanogptoss_jax.model.registry import abstract_model, build_model
from nanogptoss_jax.training.optimizer import make_optimizer
from nanogptoss_jax.training.run_config import RunConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """Everything that changes during training (the checkpoint's array part)."""

  step: jax.Array  # int32 scalar: optimiser updates done
  params: Any  # nnx.State of nnx.Param
  rest: Any  # nnx.State of the model's other variables (e.g. dropout RNG counters)
  opt_state: Any


def split_model(model):
  """(graphdef, params, rest): the static structure and the two kinds of state."""
  return nnx.split(model, nnx.Param, ...)


def init_train_state(model, tx: optax.GradientTransformation) -> TrainState:
  _, params, rest = split_model(model)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                    opt_state=tx.init(params))


def abstract_train_state(cfg: RunConfig):
  """The TrainState's shapes and dtypes for cfg, the model's graphdef and the optimiser;
  nothing allocated."""
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  graphdef = split_model(abstract_model(cfg.model))[0]
  state = jax.eval_shape(lambda: init_train_state(build_model(cfg.model, cfg.train.seed), tx))
  return graphdef, state, tx
