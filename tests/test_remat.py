"""Rematerialisation (`remat` = block / matmuls) changes what the backward pass keeps, never its
numbers: the same loss and every parameter gradient as without it."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import GptOss, GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.training.losses import token_losses
from tests.reference import relative_error

CFG = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=97,
                   hidden_size=32, intermediate_size=24, head_dim=16, num_attention_heads=4,
                   num_key_value_heads=2, sliding_window=5, rope_scaling_factor=1.0)


@functools.cache  # "none" is the reference of both cases: computed once
def _loss_and_grads(remat):
  model = GptOss(CFG, execution=ExecutionConfig(remat=remat), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 41)))
  loss = lambda m: token_losses(m, tokens)[0].mean()
  return nnx.jit(nnx.value_and_grad(loss))(model)


@pytest.mark.parametrize("remat", ["block", "matmuls"])
def test_remat_gives_the_same_loss_and_gradients(remat):
  value, grads = _loss_and_grads(remat)
  plain_value, plain_grads = _loss_and_grads("none")
  assert relative_error(value, plain_value) <= 1e-6
  for (path, ours), (_, theirs) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(plain_grads)):
    assert relative_error(ours[...], theirs[...]) <= 1e-6, path
