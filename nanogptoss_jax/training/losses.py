"""Loss functions the train step takes: `loss_fn(model, batch, cfg, moe_groups) -> (total,
metrics)`, differentiated with respect to the trainable parameters.

A batch is a dict of [B, T] arrays: `inputs` and `targets` (the next tokens), optionally `weights`
(how much each target's loss counts: 0 on prompts and padding; absent means every target counts
once) and `positions` (-1 on padding; absent means 0..T-1 in every row). Every loss is a
weighted mean over the counted tokens, so a padding token never moves it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def windows_batch(windows: jax.Array) -> dict:
  """A pretraining batch from token windows [..., T + 1]: every next token counts once."""
  return {"inputs": windows[..., :-1], "targets": windows[..., 1:]}


def as_batch(batch) -> dict:
  """A loss's batch dict; pretraining data arrives as token windows [..., T + 1]."""
  return batch if isinstance(batch, dict) else windows_batch(batch)


def token_losses(model, batch, moe_groups: int = 1):
  """Weighted next-token cross-entropy [B, T] of a batch (or of windows [B, T + 1]) and the
  model's aux stats."""
  batch = as_batch(batch)
  out = model.forward(batch["inputs"], batch.get("positions"), unembed=False,
                      moe_groups=moe_groups)
  losses = model.unembedding.cross_entropy(out.hidden, batch["targets"], batch.get("weights"))
  return losses, out.aux


def counted(batch: dict) -> jax.Array:
  """How many targets count: the sum of the weights (every target without weights)."""
  weights = batch.get("weights")
  return jnp.asarray(batch["targets"].size, jnp.float32) if weights is None else weights.sum()


def weighted_mean(losses: jax.Array, batch: dict) -> jax.Array:
  """The mean over counted targets of losses that already carry their weights; 0 when
  nothing counts."""
  if batch.get("weights") is None:
    return losses.mean()
  return losses.sum() / jnp.maximum(counted(batch), 1e-9)


def with_moe_aux(loss: jax.Array, aux: dict, cfg) -> tuple[jax.Array, dict]:
  """loss plus the MoE's weighted auxiliary losses, and their metrics (none without experts)."""
  if not aux:
    return loss, {}
  # Mean over layers: the coefficients then mean the same thing at every depth.
  balance, z_loss = aux["load_balance_loss"].mean(), aux["router_z_loss"].mean()
  total = loss + cfg.train.load_balance_coef * balance + cfg.train.router_z_coef * z_loss
  metrics = {"load_balance_loss": balance, "router_z_loss": z_loss,
             "expert_load": aux["expert_load"]}  # [L, E]
  if "expert_dropped" in aux:  # expert parallelism with a capacity: assignments dropped
    metrics["expert_dropped"] = aux["expert_dropped"].mean()
  return total, metrics


def next_token_loss(model, batch: dict, cfg, moe_groups: int = 1) -> tuple[jax.Array, dict]:
  """Cross-entropy of the counted next tokens, plus the MoE's auxiliary losses."""
  batch = as_batch(batch)
  losses, aux = token_losses(model, batch, moe_groups)
  loss = weighted_mean(losses, batch)
  total, metrics = with_moe_aux(loss, aux, cfg)
  return total, {"loss": loss, **metrics}


LossFn = Callable[..., tuple[jax.Array, dict]]
LOSSES: dict[str, LossFn] = {"next_token": next_token_loss}
