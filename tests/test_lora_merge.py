"""merge_lora: adapters folded into the weights give the adapted model's logits (float) or the
MXFP4 quantization of its dense weights (an MXFP4 base), with the cost measured."""

import jax
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.model import layer_stack
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.lora import add_lora, has_lora
from nanogptoss_jax.model.lora_merge import merge_cost, merge_lora
from nanogptoss_jax.model.quantize import quantize
from tests.lora_helpers import (CFG, FIVE, LORA, SOME, base_model, dense_weights, lora_model,
                                randomize)
from test_qlora import dequantized
from tests.factories import relative_error

TOKENS = jax.random.randint(jax.random.key(5), (2, 9), 0, CFG.vocab_size)


def _values(model, filter_=nnx.Param) -> dict:
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, filter_))}


@pytest.mark.parametrize("layers_impl", ["loop", "scan"])
def test_a_merged_float_model_is_the_dense_update(layers_impl):
  model = lora_model(layers_impl, "sorted")
  merged = merge_lora(model)
  assert has_lora(model) and not has_lora(merged)  # the adapted model is left as it was
  params = _values(model)
  adapters = {p: v for p, v in params.items() if str(p[-1]).startswith("lora_")}
  want = dense_weights({p: v for p, v in params.items() if p not in adapters}, adapters,
                       LORA.scale)
  got = _values(merged)
  assert got.keys() == want.keys() == _values(base_model(layers_impl)).keys()
  for path, value in got.items():
    np.testing.assert_allclose(value, want[path], rtol=0, atol=1e-6, err_msg=str(path))
  assert relative_error(merged(TOKENS), model(TOKENS)) < 1e-5
  cost = merge_cost(model, merged, TOKENS)
  assert cost["max_abs_logit_diff"] < 1e-4 and abs(cost["mean_kl"]) < 1e-6


def test_a_merge_onto_mxfp4_requantizes_the_dense_update():
  qlora = quantize(base_model("loop", "sorted"))
  add_lora(qlora, LORA, seed=1)
  randomize(qlora, lambda path, _: path[-1] == "lora_b", 3, 0.2)
  merged = merge_lora(qlora)
  assert merged.execution.expert_format == "mxfp4" and not has_lora(merged)
  # The oracle: dense float weights of the same adapted model, quantized by model/quantize.py.
  float_merged = merge_lora(dequantized(qlora))
  want = _values(quantize(float_merged))
  got = _values(merged)
  assert got.keys() == want.keys()
  for path, value in got.items():
    np.testing.assert_array_equal(value, want[path], err_msg=str(path))
  cost = merge_cost(qlora, merged, TOKENS)
  assert 0 < cost["max_abs_logit_diff"] < 1 and 0 <= cost["mean_kl"] < 1e-2
  with pytest.raises(ConfigError, match="no LoRA adapters"):
    merge_lora(merged)


@pytest.mark.parametrize("experts", ["float", "mxfp4"])
def test_some_layers_experts_merge_alike_in_both_layouts(experts):
  """The scan layout holds the adapters of some layers' experts beside the stacks; merging adds
  each into its own layer's entry of the stacks, as the loop layout adds it to its block."""
  def base(layers_impl):
    model = base_model(layers_impl, "sorted", cfg=FIVE)
    return quantize(model) if experts == "mxfp4" else model

  loop = add_lora(base("loop"), SOME, seed=1)
  randomize(loop, lambda path, _: path[-1] == "lora_b", 3, 0.2)
  scan = add_lora(base("scan"), SOME)
  nnx.update(scan, layer_stack.to_layout(nnx.state(loop), layer_stack.SCAN))
  merged = merge_lora(scan)
  assert not has_lora(merged) and merged.blocks.lora_experts is None
  want = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(
      layer_stack.to_layout(nnx.state(merge_lora(loop), nnx.Param), layer_stack.SCAN))}
  got = _values(merged)
  assert got.keys() == want.keys() == _values(base("scan")).keys()
  for path, value in got.items():
    np.testing.assert_allclose(value, want[path], rtol=0, atol=1e-6, err_msg=str(path))
  if experts == "float":
    assert relative_error(merged(TOKENS), scan(TOKENS)) < 1e-5
