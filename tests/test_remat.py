"""Rematerialisation (`remat` = block / matmuls) changes what the backward pass keeps, never its
numbers: the same loss and every parameter gradient as without it."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import GptOss
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.training.losses import token_losses
from tests.factories import random_module, relative_error, tiny_config

CFG = tiny_config()


@functools.cache  # "none" is the reference of both cases: computed once
def _loss_and_grads(remat):
  model = random_module(GptOss, CFG, execution=ExecutionConfig(remat=remat))
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
