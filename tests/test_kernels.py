"""Every fast path in kernels/ equals its plain twin in model/ (values and gradients), and a
whole model with every `*_impl="plain"` equals the default one."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import Gpt2, Gpt2Config, GptOss
from nanogptoss_jax.kernels.attention import QUERY_BLOCK
from nanogptoss_jax.kernels.cross_entropy import unembed_cross_entropy
from nanogptoss_jax.model.attention import attend, attention
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.unembedding import plain_cross_entropy
from nanogptoss_jax.training.losses import token_losses
from tests.factories import assert_close, normal, random_module, tiny_config

TOLERANCE = 1e-5
PLAIN = ExecutionConfig(attention_impl="plain", matmul_impl="plain", loss_impl="plain")




@pytest.mark.parametrize("groups, window, length, sinks", [
    (1, None, 2 * QUERY_BLOCK + 5, False),  # GPT-2: no sink, no window
    (2, 1, QUERY_BLOCK + 9, True),
    (4, 16, 2 * QUERY_BLOCK + 37, True),
    (8, QUERY_BLOCK + 3, 3 * QUERY_BLOCK, True),
    (3, 500, 70, True),  # a window longer than the sequence
])
def test_blocked_attention_equals_plain_attention(groups, window, length, sinks):
  batch, kv_heads, head_dim = 2, 2, 8
  q = normal((batch, length, kv_heads, groups, head_dim), 0)
  k, v = normal((2, batch, kv_heads, length, head_dim), 1)
  sink = normal((kv_heads, groups), 2) if sinks else None
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  upstream = normal(q.shape, 3)

  def loss(impl, in_order, q, k, v, sink):
    out = attend(q, k, v, positions, positions, window=window, sinks=sink, impl=impl,
                 in_order=in_order)
    return jnp.sum(out * upstream), out

  argnums = (2, 3, 4, 5) if sinks else (2, 3, 4)
  grad = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True), static_argnums=(0, 1))
  plain_grads, plain_out = grad("plain", False, q, k, v, sink)
  for in_order in (False, True):
    grads, out = grad("blocked", in_order, q, k, v, sink)
    assert_close(out, plain_out, TOLERANCE, f"output (in_order={in_order})")
    for name, ours, theirs in zip(("dq", "dk", "dv", "dsink"), grads, plain_grads):
      assert_close(ours, theirs, TOLERANCE, f"{name} (in_order={in_order})")


def test_plain_attention_with_padding_and_cache_positions():
  """Keys at unknown positions (-1) and a query row of padding: both paths agree and stay finite."""
  q = normal((1, 3, 1, 2, 4), 0)
  k, v = normal((2, 1, 1, 5, 4), 1)
  q_pos = jnp.asarray([[3, 4, -1]])
  k_pos = jnp.asarray([[0, 1, -1, 3, 4]])
  sinks = normal((1, 2), 2)
  plain = attention(q, k, v, q_pos, k_pos, window=2, sinks=sinks)
  blocked = attend(q, k, v, q_pos, k_pos, window=2, sinks=sinks, impl="blocked")
  assert np.isfinite(np.asarray(plain)).all()
  assert_close(blocked[:, :2], plain[:, :2], TOLERANCE, "output")


def test_fused_cross_entropy_equals_plain():
  hidden, kernel = normal((37, 16), 0), normal((16, 301), 1) * 3
  labels = jnp.asarray(np.random.default_rng(2).integers(0, 301, 37))
  upstream = normal((37,), 3)
  loss = lambda fn: lambda h, w: jnp.sum(fn(h, w, labels) * upstream)
  for ours, theirs in zip(jax.grad(loss(unembed_cross_entropy), (0, 1))(hidden, kernel),
                          jax.grad(loss(plain_cross_entropy), (0, 1))(hidden, kernel)):
    assert_close(ours, theirs, TOLERANCE, "gradient")
  assert_close(unembed_cross_entropy(hidden, kernel, labels),
               plain_cross_entropy(hidden, kernel, labels), TOLERANCE, "loss")


MOE_CFG = tiny_config()


@pytest.mark.parametrize("model_class, cfg, execution", [
    (GptOss, MOE_CFG, ExecutionConfig()),
    (GptOss, MOE_CFG, ExecutionConfig(moe_impl="ragged")),
    (Gpt2, Gpt2Config(num_hidden_layers=2, vocab_size=97, hidden_size=32, num_attention_heads=4,
                      max_position_embeddings=80), ExecutionConfig()),
])
def test_plain_model_equals_the_default_one(model_class, cfg, execution):
  """All plain implementations (readable attention, jnp.matmul, textbook loss, dense MoE) give
  the default fast model's logits, loss and every parameter gradient."""
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 71)))
  results = []
  for impl in (execution, PLAIN.replace(moe_impl="dense")):
    # GPT-2's dropout streams are state too; its seeded init gives both models equal weights.
    model = (random_module(model_class, cfg, execution=impl) if model_class is GptOss
             else model_class(cfg, execution=impl, rngs=nnx.Rngs(0)))
    loss = lambda m: token_losses(m, tokens)[0].mean()
    value, grads = nnx.value_and_grad(loss)(model)
    results.append((model(tokens[:, :-1]), value, grads))
  (logits, value, grads), (plain_logits, plain_value, plain_grads) = results
  assert_close(logits, plain_logits, TOLERANCE, "logits")
  assert_close(value, plain_value, TOLERANCE, "loss")
  for (path, ours), (_, theirs) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(plain_grads)):
    assert_close(ours[...], theirs[...], TOLERANCE, "grad " + ".".join(map(str, path)))


def test_cross_entropy_kernels_take_per_token_weights():
  """Fused and chunked losses scale each token by its weight, in values and gradients, as the
  plain twin does; a zero weight removes a token entirely."""
  from nanogptoss_jax.kernels.chunked_cross_entropy import chunked_cross_entropy
  hidden, kernel = normal((37, 16), 1), normal((16, 53), 2)
  labels = jnp.asarray(np.random.default_rng(3).integers(0, 53, 37))
  weights = jnp.asarray(np.random.default_rng(4).uniform(0, 2, 37) * (np.arange(37) % 5 > 0),
                        jnp.float32)
  kernels = {"fused": unembed_cross_entropy,
             "chunked": lambda h, w, y, s: chunked_cross_entropy(h, w, y, s, chunk=8)}
  plain = lambda h, w: plain_cross_entropy(h, w, labels, weights).sum()
  want, want_grads = jax.value_and_grad(plain, argnums=(0, 1))(hidden, kernel)
  unweighted = plain_cross_entropy(hidden, kernel, labels)
  np.testing.assert_allclose(plain_cross_entropy(hidden, kernel, labels, weights),
                             unweighted * weights, rtol=1e-6)
  for name, fn in kernels.items():
    value, grads = jax.value_and_grad(lambda h, w: fn(h, w, labels, weights).sum(),
                                      argnums=(0, 1))(hidden, kernel)
    assert_close(value, want, TOLERANCE, f"{name} loss")
    for ours, theirs in zip(grads, want_grads):
      assert_close(ours, theirs, TOLERANCE, f"{name} gradient")
    dropped = jax.grad(lambda h: fn(h, kernel, labels, weights).sum())(hidden)
    assert not np.asarray(dropped)[np.asarray(weights) == 0].any()
