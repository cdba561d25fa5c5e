"""The pure, jitted train and eval steps over an explicit train-state pytree."""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanogptoss_jax.parallel.mesh import batch_shards
from nanogptoss_jax.training.losses import LOSSES, LossFn, as_batch, counted, token_losses
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.state import TrainState


def _loss(params, graphdef, frozen, rest, batch, cfg: RunConfig, loss_fn: LossFn, groups: int):
  # copy=True: the Variables of `rest` belong to the trace outside value_and_grad and scan;
  # dropout's RNG counter may only be advanced by Variables of this trace.
  model = nnx.merge(graphdef, params, frozen, rest, copy=True)
  total, metrics = loss_fn(model, batch, cfg, groups)
  return total, (metrics, nnx.state(model, nnx.Not(nnx.Param)))


def make_train_step(graphdef, cfg: RunConfig, tx: optax.GradientTransformation, mesh=None,
                    loss_fn: LossFn | None = None) -> Callable:
  """train_step(state, batch [accum, B/accum, ...]) -> (state, metrics); not yet jitted.

  Only `state.params` (the trainable parameters) get gradients and optimiser updates; the
  frozen ones are read as they are. `loss_fn` defaults to the run's `train.loss`.
  """
  loss_fn = loss_fn or LOSSES[cfg.train.loss]
  groups = batch_shards(mesh)  # the MoE routes within each device's tokens
  grad_fn = jax.value_and_grad(_loss, has_aux=True)

  def train_step(state: TrainState, batch):
    batch = as_batch(batch)

    def micro_step(carry, micro_batch):
      grads_sum, rest = carry
      (_, (metrics, rest)), grads = grad_fn(state.params, graphdef, state.frozen, rest,
                                            micro_batch, cfg, loss_fn, groups)
      return (jax.tree.map(jnp.add, grads_sum, grads), rest), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, rest), metrics = jax.lax.scan(micro_step, (zeros, state.rest), batch)
    accum = jax.tree.leaves(batch)[0].shape[0]
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state,
                      frozen=state.frozen), metrics

  return on_mesh(train_step, mesh)


def on_mesh(fn: Callable, mesh) -> Callable:
  """`fn` traced under `mesh` (the MoE reads it to split experts over devices)."""
  if mesh is None:
    return fn

  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def make_eval_step(graphdef, mesh=None) -> Callable:
  """eval_step(params, frozen, rest, batch [B, ...]) -> (summed weighted token loss, summed
  weights), float32 scalars."""
  groups = batch_shards(mesh)

  def eval_step(params, frozen, rest, batch):
    model = nnx.merge(graphdef, params, frozen, rest)
    model.eval()  # dropout off
    batch = as_batch(batch)
    losses, _ = token_losses(model, batch, groups)
    return losses.sum(), counted(batch)

  return on_mesh(eval_step, mesh)
