"""The pure, jitted train and eval steps over an explicit train-state pytree."""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.state import TrainState


def token_losses(model, batch: jax.Array):
  """Next-token cross-entropy [B, T] of windows batch [B, T + 1], and the model's aux stats."""
  out = model.forward(batch[:, :-1], unembed=False)
  return model.unembedding.cross_entropy(out.hidden, batch[:, 1:]), out.aux


def _loss(params, graphdef, rest, batch, cfg: RunConfig):
  # copy=True: the Variables of `rest` belong to the trace outside value_and_grad and scan;
  # dropout's RNG counter may only be advanced by Variables of this trace.
  model = nnx.merge(graphdef, params, rest, copy=True)
  losses, aux = token_losses(model, batch)
  loss = losses.mean()
  metrics = {"loss": loss}
  total = loss
  if aux:
    # Mean over layers: the coefficients then mean the same thing at every depth.
    balance, z_loss = aux["load_balance_loss"].mean(), aux["router_z_loss"].mean()
    total = total + cfg.train.load_balance_coef * balance + cfg.train.router_z_coef * z_loss
    metrics |= {"load_balance_loss": balance, "router_z_loss": z_loss,
                "expert_load": aux["expert_load"]}  # [L, E]
  return total, (metrics, nnx.state(model, nnx.Not(nnx.Param)))


def _under_mesh(fn: Callable, mesh) -> Callable:
  """fn traced under `mesh` (when given), so the MoE dispatches within each device's tokens."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return wrapped


def make_train_step(graphdef, cfg: RunConfig, tx: optax.GradientTransformation,
                    mesh=None) -> Callable:
  """train_step(state, batch [accum, B/accum, T + 1]) -> (state, metrics); not yet jitted."""
  grad_fn = jax.value_and_grad(_loss, has_aux=True)

  def train_step(state: TrainState, batch: jax.Array):
    def micro_step(carry, micro_batch):
      grads_sum, rest = carry
      (_, (metrics, rest)), grads = grad_fn(state.params, graphdef, rest, micro_batch, cfg)
      return (jax.tree.map(jnp.add, grads_sum, grads), rest), metrics

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, rest), metrics = jax.lax.scan(micro_step, (zeros, state.rest), batch)
    accum = batch.shape[0]
    grads = jax.tree.map(lambda g: g / accum, grads)
    metrics = jax.tree.map(lambda m: m.mean(axis=0), metrics)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(step=state.step + 1, params=params, rest=rest, opt_state=opt_state), metrics

  return _under_mesh(train_step, mesh)


def make_eval_step(graphdef, mesh=None) -> Callable:
  """eval_step(params, rest, batch [B, T + 1]) -> summed token loss (float32 scalar)."""

  def eval_step(params, rest, batch):
    model = nnx.merge(graphdef, params, rest)
    model.eval()  # dropout off
    losses, _ = token_losses(model, batch)
    return losses.sum()

  return _under_mesh(eval_step, mesh)
