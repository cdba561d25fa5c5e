"""The train state (everything a step changes, and the frozen weights it reads) and its
abstract twin for restoring checkpoints."""

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanogptoss_jax.model.lora import LORA_PATTERN, add_lora
from nanogptoss_jax.model.registry import build_model
from nanogptoss_jax.training.optimizer import make_optimizer
from nanogptoss_jax.training.run_config import RunConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  """The arrays of a run. Checkpoints hold all but `frozen`, which a resume rebuilds from where
  the run started (its seed or its `init_from`, whose content hash the checkpoint records)."""

  step: jax.Array  # int32 scalar: optimiser updates done
  params: Any  # nnx.State of the trainable nnx.Params: these get gradients and moments
  rest: Any  # nnx.State of the model's other variables (e.g. dropout RNG counters)
  opt_state: Any
  frozen: Any = None  # nnx.State of the other nnx.Params: read by the step, never updated


def trainable_filter(pattern: str):
  """The nnx filter of trainable parameters: every nnx.Param, or (a regular expression) those
  whose dotted path it matches, e.g. "lora_" for adapters only."""
  if not pattern:
    return nnx.Param
  regex = re.compile(pattern)
  return nnx.All(nnx.Param, lambda path, _: bool(regex.search(".".join(map(str, path)))))


def trainable_pattern(cfg: RunConfig) -> str:
  """The run's train.trainable; with LoRA and none given, the adapters only."""
  return cfg.train.trainable or (LORA_PATTERN if cfg.lora is not None else "")


def run_model(cfg: RunConfig):
  """The run's model from its seed: the architecture, with fresh adapters if `cfg.lora`."""
  model = build_model(cfg.model, cfg.train.seed, cfg.execution)
  return model if cfg.lora is None else add_lora(model, cfg.lora, seed=cfg.train.seed)


def abstract_run_model(cfg: RunConfig):
  """`run_model`'s structure, shapes only."""
  return nnx.eval_shape(lambda: run_model(cfg))


def split_model(model, trainable: str = ""):
  """(graphdef, trainable params, frozen params, rest): the static structure and the state."""
  return nnx.split(model, trainable_filter(trainable), nnx.Param, ...)


def merge_model(graphdef, state: TrainState, **options):
  """The model a train state holds (a view on its arrays)."""
  return nnx.merge(graphdef, state.params, state.frozen, state.rest, **options)


def init_train_state(model, tx: optax.GradientTransformation, trainable: str = "") -> TrainState:
  _, params, frozen, rest = split_model(model, trainable)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                    opt_state=tx.init(params), frozen=frozen)


def abstract_train_state(cfg: RunConfig):
  """The TrainState's shapes and dtypes for cfg, the model's graphdef and the optimiser;
  nothing allocated."""
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  trainable = trainable_pattern(cfg)
  graphdef = split_model(abstract_run_model(cfg), trainable)[0]
  state = jax.eval_shape(lambda: init_train_state(run_model(cfg), tx, trainable))
  return graphdef, state, tx
