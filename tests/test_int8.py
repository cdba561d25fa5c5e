"""Weight-only int8 (model/int8.py): the int8 model computes exactly the float model whose
embedding and attention kernels are the dequantized values, LoRA over it trains as over that
float model, scales are per output channel and per layer, and the trainer starts an int8 LoRA
run from a float base."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.data.tokenizer import FullTokenizer
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import int8
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.lora import LoraConfig, add_lora, lora_filter
from nanogptoss_jax.model.lora_merge import merge_cost, merge_lora
from nanogptoss_jax.model.quantize import quantization_error, quantize
from nanogptoss_jax.pretrained.export import save_pretrained
from nanogptoss_jax.training.config_files import apply_overrides
from nanogptoss_jax.training.run_config import validate_run_config
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.loop import train
from tests.factories import relative_error
from tests.lora_helpers import CFG, FIVE, SOME, base_model, randomize
from tests.train_helpers import tiny_run

TOKENS = jax.random.randint(jax.random.key(5), (2, 9), 0, CFG.vocab_size)
COTANGENT = jax.random.normal(jax.random.key(6), (2, 9, CFG.vocab_size))


def test_scales_are_per_output_channel_and_per_layer():
  w = jax.random.normal(jax.random.key(0), (3, 16, 8)) * jnp.arange(1, 4)[:, None, None]
  values, scales = int8.quantize(w, -2)  # a stack [L, in, out]: a scale per (layer, column)
  assert values.dtype == jnp.int8 and scales.shape == (3, 8)
  np.testing.assert_allclose(scales, jnp.abs(w).max(axis=1) / int8.LEVELS, rtol=1e-6)
  error = jnp.abs(int8.dequantize(values, scales, -2) - w)
  assert bool(jnp.all(error <= scales[:, None, :] / 2 + 1e-7))  # round to nearest
  assert int(jnp.abs(values).max()) == int8.LEVELS


def _dequantized_twin(model, lora=SOME):
  """The float model holding what an int8 model computes with: q * s for each int8 matrix."""
  twin = nnx.eval_shape(lambda: add_lora(base_model(model.execution.layers_impl, "sorted",
                                                    cfg=model.cfg), lora))
  source = dict(nnx.to_flat_state(nnx.state(model)))
  flat = []
  for path, variable in nnx.to_flat_state(nnx.state(twin)):
    value = source[path][...]
    if value.dtype == jnp.int8:
      scale, axis = int8.STORAGE[path[-1]]
      value = int8.dequantize(value, source[(*path[:-1], scale)][...], axis)
    flat.append((path, variable.replace(value)))
  return nnx.merge(nnx.graphdef(twin), nnx.from_flat_state(flat))


def _grads(model):
  graphdef, adapters, rest = nnx.split(model, lora_filter(), ...)
  loss = lambda adapters: jnp.sum(nnx.merge(graphdef, adapters, rest, copy=True)(TOKENS)
                                  * COTANGENT)
  value, grads = jax.jit(jax.value_and_grad(loss))(adapters)
  return value, dict(nnx.to_flat_state(grads))


@pytest.mark.parametrize("layers_impl", ["loop", "scan"])
def test_lora_over_int8_equals_lora_over_the_dequantized_float_model(layers_impl):
  model = quantize(base_model(layers_impl, "sorted", cfg=FIVE), experts=None, dense="int8")
  kinds = {str(p[-1]) for p, v in nnx.to_flat_state(nnx.state(model)) if v.dtype == jnp.int8}
  assert kinds == {"kernel", "embedding"}  # attention's qkv and out, and the token table
  add_lora(model, SOME, seed=1)
  randomize(model, lambda path, _: path[-1] == "lora_b", 3, 0.2)
  got_value, got = _grads(model)
  want_value, want = _grads(_dequantized_twin(model))
  # (x q) s against x (q s): the same numbers rounded in another order, through five layers.
  assert relative_error(got_value, want_value) < 1e-5
  assert set(got) == set(want)
  for path in want:
    assert relative_error(got[path][...], want[path][...]) < 1e-5, path


def test_int8_costs_little_and_quantizes_once():
  model = base_model("loop", "sorted")
  quantized = quantize(model, experts=None, dense="int8")
  cost = quantization_error(model, quantized, TOKENS)
  assert 0 < cost["max_abs_logit_diff"] < 1e-2 and abs(cost["mean_kl"]) < 1e-5
  assert quantize(quantized, experts=None, dense="int8") is quantized
  both = quantize(quantized)  # then the experts to MXFP4, the int8 matrices kept
  assert both.execution.expert_format == "mxfp4" and both.execution.dense_format == "int8"


def test_an_int8_lora_run_starts_from_the_float_base(tmp_path):
  base = tiny_run(tmp_path / "base", tmp_path / "cache", steps=2, eval_every=2, ckpt_every=2,
                  sample_tokens=0)
  train(base, progress=False)
  tuned = apply_overrides(tiny_run(tmp_path / "tuned", tmp_path / "cache", init_from=base.run_dir,
                                   steps=2, eval_every=2, ckpt_every=2, sample_tokens=0),
                          ["lora.rank=4", "lora.expert_layers=1", "execution.dense_format=int8"])
  model = weights.initial_model(tuned)
  want = quantize(weights.load_checkpoint(base.run_dir)[0], experts=None, dense="int8")
  want = dict(nnx.to_flat_state(nnx.state(want)))
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if not any(str(part).startswith("lora_") for part in path):
      np.testing.assert_array_equal(np.asarray(variable[...]), np.asarray(want[path][...]))
  assert {p[1] for p, _ in nnx.to_flat_state(nnx.state(model, lora_filter()))
          if "lora_mlp1" in p} == {1}
  train(tuned, progress=False)
  loaded, _ = weights.load_checkpoint(tuned.run_dir)
  assert loaded.execution.dense_format == "int8"
  with pytest.raises(ConfigError, match="dense_format='int8' stores"):
    validate_run_config(apply_overrides(tuned, ["lora=none"]))


def test_a_merge_onto_int8_requantizes_the_dense_update():
  model = quantize(base_model("loop", "sorted"), experts=None, dense="int8")
  add_lora(model, LoraConfig(rank=4, alpha=8.0), seed=1)
  randomize(model, lambda path, _: path[-1] == "lora_b", 3, 0.2)
  merged = merge_lora(model)
  # The oracle: the float twin merged (W + s A B in float), then quantized to int8.
  want = quantize(merge_lora(_dequantized_twin(model, lora=model.lora_config)), experts=None,
                  dense="int8")
  want = dict(nnx.to_flat_state(nnx.state(want)))
  for path, value in nnx.to_flat_state(nnx.state(merged)):
    np.testing.assert_allclose(np.asarray(value[...]), np.asarray(want[path][...]), rtol=0,
                               atol=1e-6 if value.dtype != jnp.int8 else 0, err_msg=str(path))
  cost = merge_cost(model, merged, TOKENS)
  assert 0 < cost["max_abs_logit_diff"] < 1e-1 and abs(cost["mean_kl"]) < 1e-4
  with pytest.raises(UserError, match="Hugging Face's GptOss cannot read"):
    save_pretrained(merged, FullTokenizer(), "unused")
