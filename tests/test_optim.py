"""The optimiser: schedule values, which leaves decay, and decay in a real nnx.Optimizer step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.registry import abstract_model
from nanogptoss_jax.training.optimizer import decay_mask, lr_schedule, make_optimizer
from nanogptoss_jax.training.run_config import OptimConfig

OPTIM = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, weight_decay=0.1)
TOTAL_STEPS = 110


class Tiny(nnx.Module):
  """A Linear, an embedding, a 1-D sink, a norm, and MoE-like stacked expert weights and biases."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.linear = nnx.Linear(3, 4, rngs=rngs)
    self.embedding = nnx.Embed(5, 4, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.sinks = nnx.Param(jnp.ones((2,)))
    self.mlp1_weight = nnx.Param(jnp.ones((2, 4, 6)))  # [E, D, F]
    self.mlp1_bias = nnx.Param(jnp.ones((2, 6)))  # [E, F]: a bias per expert, not a matrix


def _flat(state) -> dict[str, object]:
  """{"linear/kernel": leaf}: the state's leaves, unwrapped from their nnx.Variable."""
  return {"/".join(str(k) for k in path): v.get_value() for path, v in nnx.to_flat_state(state)}


def _values(state) -> dict[str, np.ndarray]:
  return {name: np.asarray(v) for name, v in _flat(state).items()}


def test_schedule_warmup_then_cosine():
  schedule = lr_schedule(OPTIM, TOTAL_STEPS)
  np.testing.assert_allclose(schedule(0), 0.0, atol=1e-12)
  np.testing.assert_allclose(schedule(5), OPTIM.lr / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(OPTIM.warmup_steps), OPTIM.lr, rtol=1e-6)
  mid = OPTIM.warmup_steps + (TOTAL_STEPS - OPTIM.warmup_steps) // 2
  np.testing.assert_allclose(schedule(mid), (OPTIM.lr + OPTIM.min_lr) / 2, rtol=1e-5)
  np.testing.assert_allclose(schedule(TOTAL_STEPS), OPTIM.min_lr, rtol=1e-5)
  np.testing.assert_allclose(schedule(TOTAL_STEPS + 50), OPTIM.min_lr, rtol=1e-5)


@pytest.mark.parametrize("warmup_steps, total_steps", [(0, 20), (20, 20), (500, 20), (5, 1)])
def test_schedule_clips_warmup_to_the_run(warmup_steps, total_steps):
  cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=warmup_steps)
  schedule = lr_schedule(cfg, total_steps)
  values = np.array([schedule(step) for step in range(total_steps + 1)])
  assert np.all(np.isfinite(values)) and values.max() <= cfg.lr * (1 + 1e-6)
  np.testing.assert_allclose(values[-1], cfg.min_lr, rtol=1e-5)


def test_decay_mask_selects_matrices_only():
  mask = _flat(decay_mask(nnx.state(Tiny(rngs=nnx.Rngs(0)), nnx.Param)))
  decayed = sorted(name for name, flag in mask.items() if flag)
  assert decayed == ["embedding/embedding", "linear/kernel", "mlp1_weight"]
  kept = sorted(name for name, flag in mask.items() if not flag)
  assert kept == ["linear/bias", "mlp1_bias", "norm/bias", "norm/scale", "sinks"]


def test_decay_mask_on_gpt_oss_params():
  cfg = GptOssConfig(num_hidden_layers=2, num_experts=2, experts_per_token=1, vocab_size=64,
                     hidden_size=16, intermediate_size=16, head_dim=8, num_attention_heads=2,
                     num_key_value_heads=1, sliding_window=4)
  params = nnx.state(abstract_model(cfg), nnx.Param)  # shapes only: nothing allocated
  mask = _flat(decay_mask(params))
  shapes = {name: v.shape for name, v in _flat(params).items()}
  for name, flag in mask.items():
    is_weight = len(shapes[name]) >= 2 and not name.endswith(("bias", "scale", "sinks"))
    assert flag == is_weight, name
  # The matrices a reader expects: embeddings, attention, router, experts.
  assert sum(mask.values()) == 2 + cfg.num_hidden_layers * 5


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_zero_grad_step_decays_matrices_only(grad_clip):
  model = Tiny(rngs=nnx.Rngs(0))
  cfg = OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5, grad_clip=grad_clip)
  optimizer = nnx.Optimizer(model, make_optimizer(cfg, total_steps=10), wrt=nnx.Param)
  before = _values(nnx.state(model, nnx.Param))
  grads = jax.tree.map(jnp.zeros_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  after = _values(nnx.state(model, nnx.Param))
  # Adam's direction is 0 for zero gradients, so the only change is p -= lr * wd * p.
  shrink = 1 - cfg.lr * cfg.weight_decay
  for name in ("embedding/embedding", "linear/kernel", "mlp1_weight"):
    np.testing.assert_allclose(after[name], shrink * before[name], rtol=1e-6, err_msg=name)
  for name in ("linear/bias", "norm/bias", "norm/scale", "sinks", "mlp1_bias"):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.parametrize("grad_clip, expected_norm", [(1.0, 1.0), (0.0, 200.0)])
def test_clipping_happens_before_adam(grad_clip, expected_norm):
  cfg = OptimConfig(grad_clip=grad_clip)
  tx = make_optimizer(cfg, total_steps=10)
  params = {"w": jnp.zeros((2, 2))}
  grads = {"w": jnp.full((2, 2), 100.0)}  # global norm 200
  _, opt_state = tx.update(grads, tx.init(params), params)
  # Adam's first moment after one step is (1 - b1) * the gradient it was given.
  first_moment = optax.tree.get(opt_state, "mu")
  np.testing.assert_allclose(optax.tree.norm(first_moment), (1 - cfg.beta1) * expected_norm,
                             rtol=1e-5)


def test_zero_grad_step_on_split_state_decays_matrices_only():
  # The train step's path: optax sees nnx.State trees whose leaves are still nnx.Param nodes.
  _, params, _ = nnx.split(Tiny(rngs=nnx.Rngs(0)), nnx.Param, ...)
  cfg = OptimConfig(lr=0.1, min_lr=0.1, warmup_steps=0, weight_decay=0.5)
  tx = make_optimizer(cfg, total_steps=10)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  changed = {name for name, u in _values(updates).items() if np.any(u != 0)}
  assert changed == {"embedding/embedding", "linear/kernel", "mlp1_weight"}


def test_clipping_leaves_a_gradient_under_the_bound_unscaled():
  """Below max_norm the gradient passes bit for bit; above it, it is scaled to norm max_norm."""
  from nanogptoss_jax.training.optimizer import clip_by_global_norm
  clip = clip_by_global_norm(1.0)
  small = {"a": jnp.asarray([0.3, -0.4]), "b": jnp.asarray([[0.1, 0.2]])}  # norm 0.548
  out, _ = clip.update(small, clip.init(small))
  for key in small:
    np.testing.assert_array_equal(out[key], small[key])
  large = jax.tree.map(lambda g: 10 * g, small)
  out, _ = clip.update(large, clip.init(large))
  np.testing.assert_allclose(float(optax.tree.norm(out)), 1.0, rtol=1e-6)
