"""The optimiser: AdamW after global-norm clipping, warmup-cosine schedule, decay on matrices."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from nanogptoss_jax.training.run_config import OptimConfig

# Parameters that are never decayed whatever their rank: MoE expert biases are stacked into
# [E, F] arrays, yet each row is a bias vector; pulling biases, norm scales or attention sinks
# towards zero only fights the quantity they are there to learn.
NO_DECAY_NAME_SUFFIXES = ("bias", "scale", "sinks")
MATRIX_MIN_NDIM = 2


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr over warmup_steps, then cosine lr -> min_lr at total_steps."""
  # Clip the warmup so a short run (a smoke test) still gets at least one step of decay.
  warmup_steps = max(0, min(cfg.warmup_steps, total_steps - 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, 1), end_value=cfg.min_lr)


def _param_name(path: tuple) -> str:
  """The attribute name of a leaf: the last string dict key (skips nnx.Variable's `.value`)."""
  for key in reversed(path):
    if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
      return key.key
  return ""


def decay_mask(params: Any) -> Any:
  """True where weight decay applies: leaves of rank >= 2 not named like a bias, scale or sink."""
  # All matrices are decayed, the token embedding included, as nanoGPT does: the embedding is
  # a [V, D] matrix like the unembedding, and the GPT-2 baseline is treated the same way.
  def wants_decay(path, leaf) -> bool:
    return leaf.ndim >= MATRIX_MIN_NDIM and not _param_name(path).endswith(NO_DECAY_NAME_SUFFIXES)

  return jax.tree_util.tree_map_with_path(wants_decay, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm with one multiply by a scalar per element.

  optax divides every element by the norm. XLA on CPU does not duplicate a division into the
  several Adam fusions that read a gradient, so it wrote the clipped gradients out: one more
  pass over every parameter-sized array per step.
  """
  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / norm)  # norm 0 gives inf here, so scale 1
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm (when grad_clip > 0), then AdamW with the schedule and the decay mask."""
  adamw = optax.adamw(learning_rate=lr_schedule(cfg, total_steps), b1=cfg.beta1, b2=cfg.beta2,
                      eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.grad_clip > 0:
    return optax.chain(clip_by_global_norm(cfg.grad_clip), adamw)
  return adamw
