"""LoRA (model/lora.py): the base at step 0, and values and gradients equal to the dense
meaning of LoRA (ΔW = alpha / r · A B added to the weights), for every MoE dispatch and both
layer layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.model import layer_stack
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.lora import LoraConfig, add_lora, lora_filter
from tests.lora_helpers import CFG, FIVE, LORA, SOME, base_model, dense_weights, lora_model
from tests.factories import relative_error

TOKENS = jax.random.randint(jax.random.key(5), (2, 9), 0, CFG.vocab_size)
COTANGENT = jax.random.normal(jax.random.key(6), (2, 9, CFG.vocab_size))
# Every dispatch in the loop layout, and the scan layout (stacked pair + lone last block) for the
# two blocked ones.
CASES = [("loop", "dense"), ("loop", "sorted"), ("loop", "ragged"), ("scan", "sorted"),
         ("scan", "looped")]
# The experts of the middle layer only (as OpenAI's recipe adapts layers 7, 15 and 23 of 24).
MIDDLE = LoraConfig(rank=4, alpha=8.0, expert_layers=(1,))


@pytest.mark.parametrize("layers_impl,moe_impl", CASES)
def test_fresh_adapters_leave_the_base_exactly(layers_impl, moe_impl):
  logits = nnx.jit(lambda model: model(TOKENS))  # compiled: eager runs op by op, slowly
  base = base_model(layers_impl, moe_impl)
  want = logits(base)
  model = add_lora(base, LORA, seed=4)
  assert len(nnx.to_flat_state(nnx.state(model, lora_filter()))) == 2 * 6 * 3  # A, B; 6; L
  np.testing.assert_array_equal(np.asarray(logits(model)), np.asarray(want))


def _loss(logits):
  return jnp.sum(logits * COTANGENT)


@pytest.mark.parametrize("layers_impl,moe_impl,lora", [
    *((layers_impl, moe_impl, LORA) for layers_impl, moe_impl in CASES),
    ("loop", "sorted", MIDDLE)])
def test_logits_and_gradients_equal_the_dense_update(layers_impl, moe_impl, lora):
  model = lora_model(layers_impl, moe_impl, lora)
  graphdef, adapters, rest = nnx.split(model, lora_filter(), ...)
  # The oracle: the same model without adapters, its weights W + s A B.
  base = base_model(layers_impl, moe_impl)
  base_graph, base_state = nnx.split(base)
  base_flat = dict(nnx.to_flat_state(base_state))
  base_values = {path: v.get_value() for path, v in base_flat.items()}
  embedding = ("embedding", "embedding")

  def dense_logits(adapter_values, table):
    values = dense_weights({**base_values, embedding: table}, adapter_values, LORA.scale)
    state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in base_flat.items()])
    return nnx.merge(base_graph, state)(TOKENS)

  def lora_logits(adapter_state, table):
    rest_flat = [(p, v.replace(table) if p == embedding else v)
                 for p, v in nnx.to_flat_state(rest)]
    return nnx.merge(graphdef, adapter_state, nnx.from_flat_state(rest_flat))(TOKENS)

  table = base_values[embedding]
  adapter_values = {p: v.get_value() for p, v in nnx.to_flat_state(adapters)}
  grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: _loss(f(*a)), (0, 1)))
  want_loss, (want_adapters, want_table) = grad(dense_logits)(adapter_values, table)
  got_loss, (got_adapters, got_table) = grad(lora_logits)(adapters, table)
  assert relative_error(got_loss, want_loss) < 1e-5
  assert relative_error(jax.jit(lora_logits)(adapters, table),
                        jax.jit(dense_logits)(adapter_values, table)) < 1e-5
  assert relative_error(got_table, want_table) < 1e-5
  got = {p: v.get_value() for p, v in nnx.to_flat_state(got_adapters)}
  assert set(got) == set(want_adapters)
  for path, value in got.items():
    assert relative_error(value, want_adapters[path]) < 1e-5, path


@pytest.mark.parametrize("moe_impl", ["sorted", "looped"])
def test_some_layers_experts_scanned_equal_the_loop(moe_impl):
  loop = lora_model("loop", moe_impl, SOME, cfg=FIVE)
  flat = dict(nnx.to_flat_state(nnx.state(loop, lora_filter())))
  assert {p[1] for p in flat if "lora_mlp1" in p} == {1, 2, 4}
  scan = add_lora(base_model("scan", moe_impl, cfg=FIVE), SOME)
  nnx.update(scan, layer_stack.to_layout(nnx.state(loop), layer_stack.SCAN))
  assert all(p[1] == layer_stack.LORA_EXPERTS for p, _ in nnx.to_flat_state(
      nnx.state(scan, lora_filter())) if "lora_mlp1" in p)
  # The loaders' path from a flat loop state lays the adapters out the same way.
  stacked = layer_stack.stack_flat(dict(nnx.to_flat_state(nnx.state(loop))), FIVE.num_hidden_layers)
  assert set(stacked) == {p for p, _ in nnx.to_flat_state(nnx.state(scan))}

  def loss_and_grads(model):
    graphdef, adapters, rest = nnx.split(model, lora_filter(), ...)
    loss = lambda adapters: _loss(nnx.merge(graphdef, adapters, rest, copy=True)(TOKENS))
    return jax.jit(jax.value_and_grad(loss))(adapters)

  want_loss, want = loss_and_grads(loop)
  got_loss, got = loss_and_grads(scan)
  assert relative_error(got_loss, want_loss) < 1e-5
  got = dict(nnx.to_flat_state(layer_stack.to_layout(got, layer_stack.LOOP)))
  want = dict(nnx.to_flat_state(want))
  assert set(got) == set(want)
  for path in want:
    assert relative_error(got[path][...], want[path][...]) < 1e-5, path
    assert float(jnp.abs(want[path][...]).max()) > 0, path  # every adapter gets a gradient


def test_bad_settings_are_one_line():
  for bad, match in [(dict(rank=0), "lora.rank"), (dict(alpha=-1.0), "lora.alpha"),
                     (dict(targets=("q", "gate")), "lora.targets"),
                     (dict(dropout=0.1), "lora.dropout"),
                     (dict(expert_layers=(3, 1)), "lora.expert_layers"),
                     (dict(targets=("q", "v"), expert_layers=(1,)), "neither mlp1 nor mlp2")]:
    with pytest.raises(ConfigError, match=match):
      LoraConfig(**bad)
  with pytest.raises(ConfigError, match="adapters already"):
    add_lora(lora_model(), LORA)
  with pytest.raises(ConfigError, match=r"\[7\] are beyond this model's 3 layers"):
    add_lora(base_model(), LoraConfig(expert_layers=(1, 7)))
