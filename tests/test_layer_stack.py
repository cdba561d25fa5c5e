"""Scanned layers (model/layer_stack.py) against the loop: same numbers, any depth, and state
that converts between the layouts (checkpoints from before scanning resume scanned)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.interop.torch_reference import from_torch_state_dict, to_torch_state_dict
from nanogptoss_jax.model import choices, layer_stack
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss, layer_layout
from nanogptoss_jax.parallel import rules
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.training import checkpoints
from nanogptoss_jax.training.loop import Trainer, train
from nanogptoss_jax.training.weights import load_checkpoint
from tests.factories import random_module
from tests.train_helpers import tiny_run

TOLERANCE = 1e-5
SMALL = GptOssConfig(hidden_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                     num_experts=4, experts_per_token=2, intermediate_size=32, vocab_size=64,
                     sliding_window=4, rope_scaling_factor=1.0)


def _pair(layers: int, remat: str = "none"):
  """The default init of one config in both layouts (built from one seed)."""
  cfg = SMALL.replace(num_hidden_layers=layers)
  return tuple(GptOss(cfg, execution=ExecutionConfig(remat=remat, layers_impl=layout),
                      rngs=nnx.Rngs(0)) for layout in ("loop", "scan"))


def _random_pair(layers: int, remat: str = "none"):
  """Seeded random weights (every bias and sink distinct, so a layer given another's weights
  shows) in the loop layout, and the same weights stacked for the scan."""
  cfg = SMALL.replace(num_hidden_layers=layers)
  loop = random_module(GptOss, cfg, execution=ExecutionConfig(remat=remat, layers_impl="loop"))
  scan_graph = nnx.graphdef(nnx.eval_shape(lambda: GptOss(
      cfg, execution=ExecutionConfig(remat=remat, layers_impl="scan"), rngs=nnx.Rngs(0))))
  return loop, nnx.merge(scan_graph, layer_stack.to_layout(nnx.state(loop), layer_stack.SCAN))


def _loss(model, tokens):
  out = model.forward(tokens)
  return (jnp.mean(out.logits ** 2) + out.aux["load_balance_loss"].mean()
          + out.aux["router_z_loss"].mean())


@nnx.jit
def _forward_and_grads(model, tokens):
  return model.forward(tokens), nnx.grad(_loss)(model, tokens)


@nnx.jit
def _prefill_then_one(model, tokens):
  """Logits of the last token after a cached prefill of the others."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  cache = model.init_cache(tokens.shape[0], 16)
  cached = model.forward(tokens[:, :-1], positions[:, :-1], cache)
  return model.forward(tokens[:, -1:], positions[:, -1:], cached.cache).logits[:, 0]


def _close(a, b, tolerance=TOLERANCE):
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max()) <= tolerance * max(1.0, float(np.abs(b).max()))


def test_scanned_decode_writes_each_layer_in_place_and_equals_the_loop():
  """generate over scanned stacks (caches stacked per kind of layer, carried through the scan)
  draws the loop's tokens, past the sliding ring's wrap, with rows at different positions; the
  cache holds one [L/2] stack per kind and the odd last layer apart."""
  loop, scan = _random_pair(3)
  cache = scan.init_cache(2, 32)
  assert cache.sliding.k.shape[:2] == (1, 2) and cache.sliding.k.shape[3] == SMALL.sliding_window
  assert cache.full.k.shape[3] == 32 and cache.last.k.shape[:2] == (1, 2)
  prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 6]]
  assert generate(scan, prompts, 12, temperature=0.0) == generate(loop, prompts, 12,
                                                                  temperature=0.0)


def test_one_window_rule_or_a_clear_error():
  """The pairs take their windows from `layer_window`; a rule they cannot stack is refused."""
  class Thirds(GptOssConfig):
    def layer_window(self, layer):
      return self.sliding_window if layer % 3 else None
  cfg = Thirds(**{f.name: getattr(SMALL, f.name) for f in dataclasses.fields(SMALL)}
               | dict(num_hidden_layers=4))
  with pytest.raises(ValueError, match="layer 2's window"):
    GptOss(cfg, execution=ExecutionConfig(layers_impl="scan"), rngs=nnx.Rngs(0))


# Three layers: a scanned (sliding, full) pair and a last block; four: two pairs, remat'd.
@pytest.mark.parametrize("layers,remat", [(3, "none"), (4, "matmuls")])
def test_scanned_equals_loop(layers, remat):
  loop, scan = _random_pair(layers, remat)
  assert isinstance(scan.blocks, layer_stack.ScannedBlocks) and len(scan.blocks) == layers
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL.vocab_size)
  out_loop, grads_loop = _forward_and_grads(loop, tokens)
  out_scan, grads_scan = _forward_and_grads(scan, tokens)
  assert _close(out_scan.logits, out_loop.logits)
  for name in out_loop.aux:  # per-layer stats in layer order
    assert out_scan.aux[name].shape[0] == layers and _close(out_scan.aux[name], out_loop.aux[name])
  grads_loop = layer_stack.to_layout(grads_loop, layer_stack.SCAN)
  assert jax.tree.structure(grads_loop) == jax.tree.structure(grads_scan)
  for a, b in zip(jax.tree.leaves(grads_scan), jax.tree.leaves(grads_loop)):
    assert _close(a, b)
  assert scan.param_counts() == loop.param_counts()
  # Cached decoding over scanned stacks: prefill then one token equals the full forward.
  assert _close(_prefill_then_one(scan, tokens), out_loop.logits[:, -1])


def test_state_converts_both_ways_without_loss():
  loop, scan = _pair(5)
  state = nnx.state(loop)
  there = layer_stack.to_layout(state, layer_stack.SCAN)
  assert jax.tree.structure(there) == jax.tree.structure(nnx.state(scan))
  assert layer_stack.tree_layout(there) == "scan"
  for a, b in zip(jax.tree.leaves(there), jax.tree.leaves(nnx.state(scan))):
    np.testing.assert_array_equal(a, b)  # one seed, one model, whichever layout
  back = layer_stack.to_layout(there, layer_stack.LOOP)
  assert jax.tree.structure(back) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  # The reference's names, both ways, from either layout.
  names = to_torch_state_dict(loop)
  assert {k: v.tolist() for k, v in to_torch_state_dict(scan).items()} == {
      k: v.tolist() for k, v in names.items()}
  rebuilt = from_torch_state_dict(scan.cfg, names, scan.execution)
  assert isinstance(rebuilt.blocks, layer_stack.ScannedBlocks)
  tokens = jnp.arange(10)[None] % SMALL.vocab_size
  np.testing.assert_array_equal(rebuilt(tokens), scan(tokens))


def test_auto_scans_deep_models_and_stacked_axes_are_never_sharded():
  auto = ExecutionConfig()
  assert layer_layout(SMALL.replace(num_hidden_layers=4), auto) == "loop"
  assert layer_layout(SMALL.replace(num_hidden_layers=choices.SCAN_FROM_LAYERS), auto) == "scan"
  # The largest axis divides fsdp, but it counts layers: split the next one instead.
  stacked = ("layers", "experts", "embed")
  assert rules.param_spec(stacked, (8, 4, 6), {"fsdp": 2}) == jax.sharding.PartitionSpec(
      None, None, "fsdp")
  assert rules.param_spec(("embed", "expert_mlp"), (8, 6), {"fsdp": 2}) == (
      jax.sharding.PartitionSpec("fsdp", None))
  # Experts are the expert axis's to split (stacked or not), fsdp takes the next largest.
  assert rules.param_spec(stacked, (8, 4, 6), {"fsdp": 2, "expert": 4}) == (
      jax.sharding.PartitionSpec(None, "expert", "fsdp"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("token_cache")


def _losses(run_dir) -> list[tuple[int, float]]:
  return [(row["step"], row["loss"]) for row in map(json.loads, (
      run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_a_checkpoint_from_before_scanning_resumes_scanned(tmp_path, cache_dir, monkeypatch):
  """A loop-layout run whose checkpoints name no layout (as written before layers could be
  scanned) resumes with scanned layers: parameters and AdamW moments converted, the losses
  those of the uninterrupted run; load_checkpoint of the scanned run gives the loop layout."""
  def three_layers(name, impl, **train_changes):
    cfg = tiny_run(tmp_path / name, cache_dir, steps=8, eval_every=100, sample_tokens=0,
                   **train_changes)
    return dataclasses.replace(cfg, model=cfg.model.replace(num_hidden_layers=3),
                               execution=cfg.execution.replace(layers_impl=impl))

  train(three_layers("full", "loop"), progress=False)
  old_meta = checkpoints.make_meta

  def meta_without_layout(*args):
    meta = old_meta(*args)
    del meta[checkpoints.LAYER_LAYOUT_KEY]
    return meta

  monkeypatch.setattr(checkpoints, "make_meta", meta_without_layout)
  trainer = Trainer(three_layers("split", "loop"), progress=False)
  trainer.run(until=4)
  trainer.close()
  monkeypatch.setattr(checkpoints, "make_meta", old_meta)
  resumed = Trainer(three_layers("split", "scan"), progress=False)
  assert resumed.step == 4
  assert layer_stack.tree_layout(resumed.state.params) == "scan"
  assert layer_stack.tree_layout(resumed.state.opt_state) == "scan"
  resumed.run()
  resumed.close()
  expected, got = _losses(tmp_path / "full"), _losses(tmp_path / "split")
  assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 9))
  # The scan compiles other fusions than the loop: equal up to float rounding, not bit for bit.
  np.testing.assert_allclose([l for _, l in got], [l for _, l in expected], rtol=1e-4)
  model, _ = load_checkpoint(tmp_path / "split")
  assert isinstance(model.blocks, nnx.List) and len(model.blocks) == 3
  saved = layer_stack.to_layout(resumed.state.params, layer_stack.LOOP)
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(a, b)
