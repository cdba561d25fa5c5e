"""Properties of our GPT-OSS that need no reference: causality, the sliding window, sinks,
sparse-vs-dense MoE, bf16 compute, config validation, and full-size parameter counts."""

import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import ConfigError, Gpt2, Gpt2Config, GptOss, GptOssConfig
from nanogptoss_jax.kernels.attention import QUERY_BLOCK
from nanogptoss_jax.kernels.moe_dispatch import block_plan, sorted_experts
from nanogptoss_jax.model import config
from nanogptoss_jax.model.attention import attend
from nanogptoss_jax.model.choices import moe_impl as resolve_moe_impl
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.moe import MoE, dense_experts, swiglu
from nanogptoss_jax.model.params import count_params
from nanogptoss_jax.model.rope import rope_tables, rope_tables_in_order
from nanogptoss_jax.training.config_files import load_config_file
from tests.factories import normal, random_module, relative_error, tiny_config

WINDOW = 4
LENGTH = 12  # > 2 * WINDOW, so the window really drops keys
CFG = tiny_config(vocab_size=64, sliding_window=WINDOW)
MOE_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2








def _model(cfg: GptOssConfig = CFG, seed: int = 0, execution=None) -> GptOss:
  return random_module(GptOss, cfg, seed, execution)


def _positions(batch: int, length: int) -> jax.Array:
  return jnp.asarray(np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)))


def _logits_from_embeddings(model: GptOss, x: jax.Array) -> jax.Array:
  """GptOss.forward from the embedding output on: differentiable w.r.t. x [B, T, D]."""
  positions = _positions(*x.shape[:2])
  rope = rope_tables(model.cfg, positions)
  for block in model.blocks:
    x, _, _ = block(x, positions, rope)
  return model.unembedding(model.norm(x))


def _block_output(model: GptOss, layer: int, x: jax.Array) -> jax.Array:
  """Block `layer` alone applied to x [B, T, D]."""
  positions = _positions(*x.shape[:2])
  return model.blocks[layer](x, positions, rope_tables(model.cfg, positions))[0]


def _influence(fn, x: jax.Array, direction: jax.Array) -> jax.Array:
  """[B, T, B, S] bool: does output (b, t) of fn(x) [B, T, ·] depend on input (b', s)?

  Each output row is projected on a random direction so nothing can cancel by symmetry.
  """
  jacobian = jax.jacrev(lambda x: jnp.sum(fn(x) * direction, axis=-1))(x)  # [B, T, B, S, D]
  return jnp.any(jacobian != 0, axis=-1)


@nnx.jit
def _influence_maps(model: GptOss, x: jax.Array):
  """Dependency maps of the logits and of each block alone on their inputs, in one compile."""
  keys = jax.random.split(jax.random.key(5), model.cfg.num_hidden_layers + 1)
  out_shape = x.shape[:2] + (model.cfg.vocab_size,)
  logits = _influence(lambda x: _logits_from_embeddings(model, x), x,
                      jax.random.normal(keys[0], out_shape))
  blocks = [_influence(lambda x: _block_output(model, layer, x), x,
                       jax.random.normal(keys[layer + 1], x.shape))
            for layer in range(model.cfg.num_hidden_layers)]
  return logits, blocks


def _embeddings(batch: int = 2, length: int = LENGTH, seed: int = 1) -> np.ndarray:
  return np.asarray(normal((batch, length, CFG.hidden_size), seed))


@functools.cache
def _influences():
  """(logits [B, T, B, S], [per-block maps]) for the shared random model, computed once."""
  maps = _influence_maps(_model(), _embeddings())
  return jax.tree.map(np.asarray, maps)


def _visibility(length: int, window: int | None) -> np.ndarray:
  """[T, S] bool written out longhand: s <= t, and t - s < window on sliding layers."""
  t, s = np.arange(length)[:, None], np.arange(length)[None, :]
  return (s <= t) & ((t - s < window) if window is not None else True)


def _same_row(visibility: np.ndarray, batch: int = 2) -> np.ndarray:
  """[B, T, B, S]: `visibility` [T, S] within a row, nothing across rows."""
  return np.eye(batch, dtype=bool)[:, None, :, None] & visibility[None, :, None, :]


def test_logits_depend_only_on_past_tokens_of_their_own_row():
  logits, _ = _influences()
  # Zero exactly (not just small) for the future and for other rows; non-zero for every earlier
  # position, since the full-attention layer reaches back to the start.
  np.testing.assert_array_equal(logits, _same_row(_visibility(LENGTH, None)))


@pytest.mark.parametrize("layer", [0, 1])
def test_each_layer_sees_exactly_its_window(layer):
  window = CFG.layer_window(layer)
  assert window == (WINDOW if layer == 0 else None)  # even layers slide, odd ones see all
  _, blocks = _influences()
  np.testing.assert_array_equal(blocks[layer], _same_row(_visibility(LENGTH, window)))


@nnx.jit
def _block_outputs(model: GptOss, x: jax.Array) -> list[jax.Array]:
  return [_block_output(model, layer, x) for layer in range(len(model.blocks))]


def test_sliding_layer_drops_the_key_just_outside_the_window():
  t = LENGTH - 1
  # Rows: as is, bumped `window` keys back (outside), bumped `window - 1` back (inside). Rows
  # are independent (see the causality test), so one batch holds all three.
  rows = np.repeat(_embeddings(batch=1), 3, axis=0)
  rows[1, t - WINDOW] += 1.0
  rows[2, t - WINDOW + 1] += 1.0
  for layer, out in enumerate(_block_outputs(_model(), rows)):
    base, outside, inside = np.asarray(out[:, t])
    assert not np.array_equal(inside, base), f"layer {layer}: key t - window + 1 ignored"
    # Layer 0 slides: the key `window` steps back is invisible. Layer 1 is full and sees it.
    assert np.array_equal(outside, base) == (layer == 0), f"layer {layer}: key t - window"


_attend = jax.jit(attend, static_argnames="window")


@functools.partial(jax.jit, static_argnames="window")
def _softmax_attention(q, k, v, window, sinks=None):
  """Textbook masked attention with jax.nn.softmax (q [B, T, K, G, H], k/v [B, K, S, H]); a
  sink is one more score column, dropped after the softmax."""
  scores = jnp.einsum("btkgh,bksh->bkgts", q, k) / math.sqrt(q.shape[-1])
  scores = jnp.where(_visibility(q.shape[1], window), scores, -jnp.inf)
  if sinks is None:
    weights = jax.nn.softmax(scores, axis=-1)
  else:
    column = jnp.broadcast_to(sinks[None, :, :, None, None], scores.shape[:-1] + (1,))
    weights = jax.nn.softmax(jnp.concatenate([scores, column], axis=-1), axis=-1)[..., :-1]
  return jnp.einsum("bkgts,bksh->btkgh", weights, v)


def _random_qkv(batch=2, length=7, kv_heads=2, groups=3, head_dim=8):
  """q [B, T, K, G, H]; k and v [B, K, S, H] with S = T (attend's layouts)."""
  q = normal((batch, length, kv_heads, groups, head_dim), seed=0)
  k, v = normal((2, batch, kv_heads, length, head_dim), seed=1)
  return q, k, v


@pytest.mark.parametrize("window", [None, 1, QUERY_BLOCK, QUERY_BLOCK + 6])
def test_skipping_key_blocks_changes_nothing(window):
  """in_order attention (query blocks that skip the key blocks they cannot see) gives the same
  outputs and gradients as attending over every key; the last block is a partial one."""
  q, k, v = _random_qkv(length=2 * QUERY_BLOCK + 37, groups=2)
  positions = _positions(*q.shape[:2])
  sinks = normal(q.shape[2:4], seed=3)
  upstream = normal(q.shape, seed=4)

  def loss(q, k, v, sinks, in_order):
    out = attend(q, k, v, positions, positions, window=window, sinks=sinks, in_order=in_order)
    return jnp.sum(out * upstream), out

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True), static_argnums=4)
  (whole, out_whole), (blocked, out_blocked) = (grad(q, k, v, sinks, in_order)
                                                for in_order in (False, True))
  np.testing.assert_allclose(out_blocked, out_whole, rtol=1e-5, atol=1e-6)
  for name, a, b in zip("q k v sinks".split(), blocked, whole):
    assert relative_error(a, b) < 1e-5, f"d{name} differs: {relative_error(a, b):.2e}"


def test_default_positions_take_the_block_skipping_path_and_agree():
  """forward(tokens) (positions implied, so in order) == forward(tokens, explicit positions)."""
  model = _model()
  length = QUERY_BLOCK + 9  # two query blocks, the window (4) far shorter than a block
  tokens = np.random.default_rng(5).integers(0, CFG.vocab_size, (2, length))
  positions = np.broadcast_to(np.arange(length), tokens.shape)
  implied = nnx.jit(lambda m, t: m.forward(t).logits)(model, tokens)
  explicit = nnx.jit(lambda m, t, p: m.forward(t, p).logits)(model, tokens, positions)
  np.testing.assert_allclose(implied, explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scaling", [1.0, 32.0])
def test_constant_rope_tables_equal_traced_ones(scaling):
  """Training's numpy-built tables for positions 0..T-1 (also with YaRN) == the traced ones."""
  cfg = CFG.replace(rope_scaling_factor=scaling, initial_context_length=256)
  length = 4096  # large angles, where two float32 sin implementations could drift apart
  constant = rope_tables_in_order(cfg, length)
  traced = jax.jit(lambda p: rope_tables(cfg, p))(_positions(1, length))
  for a, b in zip(constant, traced):
    assert a.shape == b.shape == (1, length, cfg.head_dim // 2)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_sink_at_minus_infinity_is_plain_softmax(window):
  q, k, v = _random_qkv()
  positions = _positions(*q.shape[:2])
  expected = _softmax_attention(q, k, v, window)
  for sinks in (np.full(q.shape[2:4], -np.inf, np.float32), None):  # [K, G] at -inf, or no sinks at all
    ours = _attend(q, k, v, positions, positions, window=window, sinks=sinks)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6, err_msg=f"sinks={sinks}")


def test_finite_sink_is_an_extra_softmax_column_that_is_dropped():
  q, k, v = _random_qkv()
  positions = _positions(*q.shape[:2])
  sinks = normal(q.shape[2:4], seed=2)  # [K, G]
  ours = _attend(q, k, v, positions, positions, window=None, sinks=sinks)
  np.testing.assert_allclose(ours, _softmax_attention(q, k, v, None, sinks), rtol=1e-6, atol=1e-6)


# (impl, groups) checked against ("dense", 1). Every case for top-2; for top-1 and top-all only
# the grouped dispatch (a superset of the ungrouped code path), as each case costs ~3 s to compile.
ALL_MOE_CASES = (("dense", 1), ("sorted", 1), ("looped", 1), ("ragged", 1), ("sorted", 2),
                 ("looped", 2), ("ragged", 2))
GROUPED_MOE_CASES = (("dense", 1), ("sorted", 2), ("looped", 2), ("ragged", 2))


@functools.partial(nnx.jit, static_argnames="cases")
def _moe_outputs_and_grads(moe, x, cotangent, cases):
  """{(impl, groups): (output, (param grads, x grad))} of <output, cotangent>, in one compile."""
  def run(impl, groups):
    def loss(moe, x):
      out, _ = moe(x, groups=groups, impl=impl)
      return jnp.sum(out * cotangent), out
    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(moe, x)
    return out, grads
  return {case: run(*case) for case in cases}


@pytest.mark.parametrize("experts_per_token, cases", [
    (1, GROUPED_MOE_CASES), (2, ALL_MOE_CASES), (4, GROUPED_MOE_CASES)])
def test_sparse_moe_matches_dense_oracle(experts_per_token, cases):
  cfg = CFG.replace(experts_per_token=experts_per_token)
  moe = random_module(MoE, cfg)
  x = normal((4, 6, cfg.hidden_size), seed=2)  # 24 tokens, 2 groups of 12
  cotangent = normal(x.shape, seed=3)
  results = _moe_outputs_and_grads(moe, x, cotangent, cases)
  dense_out, (dense_params, dense_x) = results["dense", 1]
  for (impl, groups), (out, (params, grad_x)) in results.items():
    where = f"impl={impl} groups={groups} C={experts_per_token}"
    assert relative_error(out, dense_out) <= MOE_TOLERANCE, f"{where}: output"
    assert relative_error(grad_x, dense_x) <= MOE_TOLERANCE, f"{where}: grad x"
    for (path, grad), (_, dense_grad) in zip(nnx.to_flat_state(params),
                                             nnx.to_flat_state(dense_params)):
      # With C = 1 the router gets no gradient (its weight is a softmax over one logit): all-zero
      # grads must then be all-zero on both sides, which relative_error checks.
      err = relative_error(grad[...], dense_grad[...])
      assert err <= MOE_TOLERANCE, f"{where}: grad {'.'.join(map(str, path))} rel err {err:.2e}"


def test_sorted_blocks_suffice_for_the_worst_routing():
  # Three groups of R + 1 assignments each end in a block holding one row: this routing needs
  # every block the plan allows (the bound is tight), and sorted must still equal dense.
  moe = random_module(MoE, CFG.replace(experts_per_token=1))
  tokens, experts = 4096, CFG.num_experts
  rows = block_plan(jnp.zeros((tokens, 1), jnp.int32), experts).rows_per_block
  sizes = [rows + 1] * (experts - 1) + [tokens - (experts - 1) * (rows + 1)]
  rng = np.random.default_rng(6)
  top_experts = jnp.asarray(rng.permutation(np.repeat(np.arange(experts), sizes))[:, None])
  plan = block_plan(top_experts, experts)
  needed = sum(-(-size // rows) for size in sizes)
  assert plan.num_rows == needed * rows, (plan.num_rows // rows, needed)
  t = jnp.asarray(normal((tokens, CFG.hidden_size), seed=5))
  top_weights = jnp.ones((tokens, 1), jnp.float32)
  weights = tuple(p[...] for p in (moe.mlp1_weight, moe.mlp1_bias, moe.mlp2_weight, moe.mlp2_bias))
  experts = dict(activation=functools.partial(swiglu, limit=CFG.swiglu_limit),
                 matmul=jnp.matmul)
  sparse = jax.jit(functools.partial(sorted_experts, **experts))(t, top_experts, top_weights,
                                                                 weights)
  dense = jax.jit(functools.partial(dense_experts, **experts))(t, top_experts, top_weights,
                                                               weights)
  assert relative_error(sparse, dense) <= MOE_TOLERANCE


def test_auto_moe_is_dense_for_a_decode_step_and_sorted_for_a_batch():
  # bench-201k's decode (4 experts, top-2): dense computes 4 rows and reads 4 experts' weights,
  # sorted pads 2 assignments into 2 blocks of MIN_BLOCK_ROWS rows and copies 2 experts' weights.
  assert resolve_moe_impl("auto", tokens=1, num_experts=4, per_token=2) == "dense"
  assert resolve_moe_impl("auto", tokens=8, num_experts=4, per_token=2) == "dense"
  # Top-1 (medium) and many experts (gpt-oss-20b): dense would read far more weights.
  assert resolve_moe_impl("auto", tokens=1, num_experts=4, per_token=1) == "sorted"
  assert resolve_moe_impl("auto", tokens=1, num_experts=32, per_token=4) == "sorted"
  # A train batch: dense would compute twice the rows.
  assert resolve_moe_impl("auto", tokens=4096, num_experts=4, per_token=2) == "sorted"
  assert resolve_moe_impl("ragged", tokens=1, num_experts=4, per_token=2) == "ragged"
  # gpt-oss-20b's 2,048-token step: sorted's 159 blocks would copy 7.9 GB of bf16 weights.
  expert_bytes = 3 * 2880 * 2880 * 2
  assert resolve_moe_impl("auto", 2048, 32, 4, expert_bytes) == "looped"
  assert resolve_moe_impl("auto", 1, 32, 4, expert_bytes) == "sorted"


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def test_bfloat16_compute_stays_close_to_float32():
  # Every expert on every token: with top-k, bf16 rounding may flip a near-tie in the routing
  # and move that token's logits by O(1), a discrete effect no tolerance describes.
  cfg = CFG.replace(experts_per_token=CFG.num_experts)
  high = _model(cfg)
  low = _model(cfg, execution=ExecutionConfig(dtype="bfloat16"))  # same float32 weights
  tokens = np.random.default_rng(4).integers(0, CFG.vocab_size, (2, LENGTH), dtype=np.int32)
  err = relative_error(_logits(low, tokens), _logits(high, tokens))
  print(f"\n[bf16 vs f32 logits] rel err {err:.2e}")
  assert err < BF16_TOLERANCE, f"bf16 logits rel err {err:.2e}"
  # And bfloat16 really ran: identical logits would mean the compute dtype was ignored.
  assert err > 1e-4, f"bf16 logits within {err:.2e} of float32: was bfloat16 computed at all?"


@pytest.mark.parametrize("build, message", [
    (lambda: CFG.replace(num_attention_heads=6, num_key_value_heads=4),
     "num_attention_heads must be a multiple of num_key_value_heads=4"),
    (lambda: CFG.replace(num_experts=4, experts_per_token=5),
     "experts_per_token must be <= num_experts=4"),
    (lambda: CFG.replace(head_dim=16, rope_scaling_factor=32.0, initial_context_length=64),
     "must give YaRN ramp bounds 0 < low < high < head_dim/2 - 1"),
    (lambda: Gpt2Config(hidden_size=30, num_attention_heads=4),
     "hidden_size must be a multiple of num_attention_heads=4"),
    (lambda: CFG.replace(num_hidden_layers=True), "num_hidden_layers must be a positive integer"),
    (lambda: CFG.replace(rope_scaling_factor=math.inf), "rope_scaling_factor must be a finite"),
    (lambda: Gpt2Config(layer_norm_eps=0.0), "layer_norm_eps must be > 0"),
])
def test_bad_configs_are_refused_with_a_clear_message(build, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    build()


def _expected_gptoss_counts(cfg: GptOssConfig) -> dict[str, int]:
  """Parameter counts from shape formulas, independently of the model code."""
  d, f, h, e = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_experts
  heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
  qkv = (heads + 2 * kv_heads) * h
  attention = d + d * qkv + qkv + heads + heads * h * d + d  # norm, qkv, sinks, out
  expert = d * 2 * f + 2 * f + f * d + d  # mlp1 (gate and linear units) and mlp2, with biases
  mlp = d + d * e + e + e * expert  # norm, router, experts
  total = 2 * cfg.vocab_size * d + cfg.num_hidden_layers * (attention + mlp) + d
  unused = cfg.num_hidden_layers * (e - cfg.experts_per_token) * expert
  return {"total": total, "active": total - unused}


def _abstract(cls, cfg):
  """The model as ShapeDtypeStructs: nothing allocated, however large."""
  model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))
  return model


@functools.cache
def _preset(preset: str) -> GptOssConfig:
  if preset == "medium":  # the seed's training setup
    return load_config_file(Path(__file__).parents[1] / "configs" / "medium.py").model
  return getattr(config, preset)


def _preset_counts(preset: str) -> dict[str, int]:
  return _abstract(GptOss, _preset(preset)).param_counts()


@pytest.mark.parametrize("preset", ["medium", "GPT_OSS_20B"])
def test_full_size_parameter_counts(preset):
  counts = _preset_counts(preset)
  print(f"\n[params] {preset}: total {counts['total']:,}, active {counts['active']:,}")
  assert counts == _expected_gptoss_counts(_preset(preset))


def test_gpt_oss_20b_counts_match_the_model_card():
  counts = _preset_counts("GPT_OSS_20B")
  embedding = config.GPT_OSS_20B.vocab_size * config.GPT_OSS_20B.hidden_size
  assert round(counts["total"] / 1e9, 2) == 20.91
  # The card's 3.61B active leaves out the embedding table (a lookup, not a matmul).
  assert round((counts["active"] - embedding) / 1e9, 2) == 3.61


def test_gpt2_active_equals_total():
  cfg = Gpt2Config(num_hidden_layers=2, vocab_size=64, hidden_size=32, num_attention_heads=4,
                   max_position_embeddings=16)
  d, f = cfg.hidden_size, cfg.mlp_size
  block = 2 * 2 * d + d * 3 * d + 3 * d + d * d + d + d * f + f + f * d + d  # 2 LNs, attn, mlp
  expected = 2 * cfg.vocab_size * d + cfg.max_position_embeddings * d + 2 * d + 2 * block
  model = _abstract(Gpt2, cfg)
  assert count_params(model) == expected
  assert model.param_counts() == {"total": expected, "active": expected}


def test_bfloat16_attention_gradients_near_autodiffs():
  """The hand-written attention backward in bfloat16 stays within 1.75x of the error that
  autodiff of the textbook softmax makes in bfloat16 (both against float32 autodiff), with
  values far from zero, where bfloat16 rounding hurts most (this draw: 0.9-1.4x)."""
  batch, length, kv_heads, groups, head_dim = 2, 128, 2, 2, 64
  rng = np.random.default_rng(0)
  normal = lambda shape, mean=0.0: jnp.asarray(mean + rng.standard_normal(shape), jnp.float32)
  q = normal((batch, length, kv_heads, groups, head_dim))
  k = normal((batch, kv_heads, length, head_dim))
  v, sinks = normal((batch, kv_heads, length, head_dim), 64.0), normal((kv_heads, groups))
  upstream = normal((batch, length, kv_heads, groups, head_dim))
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))

  def ours(q, k, v, sinks):
    out = attend(q, k, v, positions, positions, window=None, sinks=sinks)
    return jnp.sum(out.astype(jnp.float32) * upstream)

  def textbook(q, k, v, sinks):
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(jnp.tril(jnp.ones((length, length), bool)), scores / head_dim ** 0.5,
                       -jnp.inf)
    sink_column = jnp.broadcast_to(sinks[None, :, :, None, None], scores.shape[:-1] + (1,))
    weights = jax.nn.softmax(jnp.concatenate([scores, sink_column], -1), -1)[..., :-1]
    out = jnp.einsum("bkgts,bksh->btkgh", weights.astype(v.dtype), v)
    return jnp.sum(out.astype(jnp.float32) * upstream)

  grads = lambda fn, *args: jax.grad(fn, (0, 1, 2, 3))(*args)
  truth = grads(textbook, q, k, v, sinks)
  low = [x.astype(jnp.bfloat16) for x in (q, k, v)] + [sinks]
  for name, got, autodiff, want in zip(("dq", "dk", "dv", "dsinks"), grads(ours, *low),
                                       grads(textbook, *low), truth):
    error, bound = relative_error(got, want), 1.75 * relative_error(autodiff, want)
    assert error <= bound, f"{name}: {error:.2e} vs autodiff's {bound / 1.75:.2e}"


def test_gpt2_refuses_more_tokens_than_positions():
  """Past the learned table the lookup gives NaN rows, and attention spreads them everywhere."""
  model = Gpt2(Gpt2Config(num_hidden_layers=1, vocab_size=50, hidden_size=16,
                          num_attention_heads=2, max_position_embeddings=8), rngs=nnx.Rngs(0))
  assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 50)
  with pytest.raises(ValueError, match="12 tokens exceed GPT-2's max_position_embeddings=8"):
    model(jnp.zeros((1, 12), jnp.int32))
