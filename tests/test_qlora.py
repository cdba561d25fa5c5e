"""QLoRA: LoRA over MXFP4 experts kept as uint8 blocks + scales and decoded in the step equals
LoRA over the dequantized base, in values and gradients (adapters and input), and never
differentiates the blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.model import mxfp4
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.lora import add_lora, lora_filter
from nanogptoss_jax.model.quantize import quantize
from tests.lora_helpers import CFG, LORA, base_model, randomize
from tests.factories import relative_error

COTANGENT_SEED = 6


def dequantized(model: GptOss) -> GptOss:
  """The float-expert twin of an MXFP4 LoRA model: every expert matrix decoded by the plain
  LUT, the adapters the same arrays."""
  execution = model.execution.replace(expert_format="float")
  twin = nnx.eval_shape(lambda: add_lora(GptOss(model.cfg, execution=execution,
                                                rngs=nnx.Rngs(0)), LORA))
  source = dict(nnx.to_flat_state(nnx.state(model)))
  flat = []
  for path, variable in nnx.to_flat_state(nnx.state(twin)):
    if path[-1] in ("mlp1_weight", "mlp2_weight"):
      stem = (*path[:-1], path[-1].replace("weight", ""))
      value = jnp.swapaxes(mxfp4.decode(source[(*stem[:-1], stem[-1] + "blocks")][...],
                                        source[(*stem[:-1], stem[-1] + "scales")][...]), -1, -2)
    else:
      value = source[path][...]
    flat.append((path, variable.replace(value)))
  return nnx.merge(nnx.graphdef(twin), nnx.from_flat_state(flat))


def _grads(model, tokens):
  graphdef, adapters, rest = nnx.split(model, lora_filter(), ...)
  embedding = ("embedding", "embedding")
  table = dict(nnx.to_flat_state(rest))[embedding].get_value()
  cotangent = jax.random.normal(jax.random.key(COTANGENT_SEED), (*tokens.shape, CFG.vocab_size))

  def loss(adapter_state, table):
    flat = [(p, v.replace(table) if p == embedding else v) for p, v in nnx.to_flat_state(rest)]
    # copy=True, as the training step: nnx.remat inside this trace cannot write back to
    # Variables made outside it.
    logits = nnx.merge(graphdef, adapter_state, nnx.from_flat_state(flat), copy=True)(tokens)
    return jnp.sum(logits * cotangent)

  value, (adapter_grads, table_grad) = jax.jit(jax.value_and_grad(loss, (0, 1)))(adapters, table)
  return value, dict(nnx.to_flat_state(adapter_grads)), table_grad


@pytest.mark.parametrize("layers_impl,moe_impl,shape,remat", [
    ("loop", "sorted", (2, 9), "none"),  # a prefill: every expert decoded once
    ("loop", "sorted", (1, 1), "none"),  # a decode step: only the blocks' experts decoded
    ("scan", "looped", (2, 9), "none"),  # one block's expert decoded at a time
    ("scan", "looped", (2, 9), "block"),  # as configs/finetune_20b_lora.py runs
    ("scan", "sorted", (1, 1), "none"),  # a scanned decode step: the blocks' experts indexed
    ("scan", "dense", (2, 9), "none")])
def test_qlora_equals_lora_over_the_dequantized_base(layers_impl, moe_impl, shape, remat):
  tokens = jax.random.randint(jax.random.key(5), shape, 0, CFG.vocab_size)
  # Scanned pairs reading experts from the whole MXFP4 stacks: two pairs and a last layer, so a
  # pair that read another pair's shows.
  cfg = CFG.replace(num_hidden_layers=5) if moe_impl in ("looped", "sorted") and \
      layers_impl == "scan" else CFG
  qlora = quantize(base_model(layers_impl, moe_impl, cfg=cfg, remat=remat))
  assert qlora.execution.expert_format == "mxfp4"
  add_lora(qlora, LORA, seed=1)
  randomize(qlora, lambda path, _: path[-1] == "lora_b", 3, 0.2)
  lora = dequantized(qlora)  # its adapters are the same arrays
  got_value, got, got_table = _grads(qlora, tokens)
  want_value, want, want_table = _grads(lora, tokens)
  assert relative_error(got_value, want_value) < 1e-6
  assert relative_error(got_table, want_table) < 1e-6
  assert set(got) == set(want) and len(got) == 36
  for path in got:
    assert relative_error(got[path][...], want[path][...]) < 1e-6, path
  # The blocks stay uint8 and outside what is differentiated.
  blocks = [v for p, v in nnx.to_flat_state(nnx.state(qlora)) if p[-1] == "mlp1_blocks"]
  assert blocks and all(np.asarray(v[...]).dtype == np.uint8 for v in blocks)
