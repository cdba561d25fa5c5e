"""Properties of our GPT-OSS that need no reference: causality, the sliding window, sinks,
sparse-vs-dense MoE, bf16 compute, config validation, and full-size parameter counts."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import ConfigError, Gpt2, Gpt2Config, GptOss, GptOssConfig, config
from nanogptoss_jax.attention import attend
from nanogptoss_jax.moe import MoE
from nanogptoss_jax.params import count_params, param_counts
from nanogptoss_jax.rope import rope_tables
from tests.reference import relative_error

WINDOW = 4
LENGTH = 12  # > 2 * WINDOW, so the window really drops keys
CFG = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=64,
                   hidden_size=32, intermediate_size=24, head_dim=16, num_attention_heads=4,
                   num_key_value_heads=2, sliding_window=WINDOW, rope_scaling_factor=1.0)
MOE_TOLERANCE = 1e-5
BF16_TOLERANCE = 2e-2


def _randomize(module: nnx.Module, seed: int = 0) -> nnx.Module:
  """Overwrites every parameter with a seeded draw: the default init zeroes biases and sinks,
  which would let bugs in them pass unseen."""
  rng = np.random.default_rng(seed)
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Param)):
    name, shape = path[-1], variable.shape
    if name == "scale":
      value = 1.0 + rng.normal(0.0, 0.1, shape)
    elif name in ("bias", "mlp1_bias", "mlp2_bias", "sinks"):
      value = rng.normal(0.0, 1.0 if name == "sinks" else 0.1, shape)
    elif name == "embedding":
      value = rng.normal(0.0, 1.0, shape)
    else:  # [in, out] or [E, in, out]: 1/sqrt(fan_in) keeps activations O(1)
      value = rng.normal(0.0, 1.0 / math.sqrt(shape[-2]), shape)
    variable.set_value(jnp.asarray(value, variable.dtype))
  return module


def _model(cfg: GptOssConfig = CFG, seed: int = 0) -> GptOss:
  return _randomize(GptOss(cfg, rngs=nnx.Rngs(seed)), seed)


def _positions(batch: int, length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length), (batch, length))


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


@functools.cache
def _influences():
  """(logits [B, T, B, S], [per-block maps]) for the shared random model, computed once."""
  maps = _influence_maps(_model(), _embeddings())
  return jax.tree.map(np.asarray, maps)


def _embeddings(batch: int = 2, length: int = LENGTH, seed: int = 1) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, length, CFG.hidden_size))


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
  x = _embeddings(batch=1)[0]
  # Rows: as is, bumped `window` keys back (outside), bumped `window - 1` back (inside). Rows
  # are independent (see the causality test), so one batch holds all three.
  rows = jnp.stack([x, x.at[t - WINDOW].add(1.0), x.at[t - WINDOW + 1].add(1.0)])
  for layer, out in enumerate(_block_outputs(_model(), rows)):
    base, outside, inside = np.asarray(out[:, t])
    assert not np.array_equal(inside, base), f"layer {layer}: key t - window + 1 ignored"
    # Layer 0 slides: the key `window` steps back is invisible. Layer 1 is full and sees it.
    assert np.array_equal(outside, base) == (layer == 0), f"layer {layer}: key t - window"


_attend = jax.jit(attend, static_argnames="window")


def _plain_softmax_attention(q, k, v, window):
  """Textbook masked softmax attention with jax.nn.softmax: q [B, T, K, G, H], k/v [B, S, K, H]."""
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k) / math.sqrt(q.shape[-1])
  mask = _visibility(q.shape[1], window)
  weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
  return jnp.einsum("bkgts,bskh->btkgh", weights, v)


def _random_qkv(batch=2, length=7, kv_heads=2, groups=3, head_dim=8):
  q, k, v = jax.random.normal(jax.random.key(0), (3, batch, length, kv_heads, groups * head_dim))
  q = q.reshape(batch, length, kv_heads, groups, head_dim)
  return q, k[..., :head_dim], v[..., :head_dim]


@pytest.mark.parametrize("window", [None, 3])
def test_sink_at_minus_infinity_is_plain_softmax(window):
  q, k, v = _random_qkv()
  positions = _positions(*q.shape[:2])
  sinks = jnp.full(q.shape[2:4], -jnp.inf)
  ours = _attend(q, k, v, positions, positions, window=window, sinks=sinks)
  expected = _plain_softmax_attention(q, k, v, window)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)
  no_sinks = _attend(q, k, v, positions, positions, window=window, sinks=None)
  np.testing.assert_allclose(no_sinks, expected, rtol=1e-6, atol=1e-6)


def test_finite_sink_is_an_extra_softmax_column_that_is_dropped():
  q, k, v = _random_qkv()
  positions = _positions(*q.shape[:2])
  sinks = jax.random.normal(jax.random.key(1), q.shape[2:4])  # [K, G]
  ours = _attend(q, k, v, positions, positions, window=None, sinks=sinks)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k) / math.sqrt(q.shape[-1])
  scores = jnp.where(_visibility(q.shape[1], None), scores, -jnp.inf)
  sink_column = jnp.broadcast_to(sinks[None, :, :, None, None], scores.shape[:-1] + (1,))
  weights = jax.nn.softmax(jnp.concatenate([scores, sink_column], axis=-1), axis=-1)[..., :-1]
  expected = jnp.einsum("bkgts,bskh->btkgh", weights, v)
  np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


# Every sparse dispatch, with one and with two groups, against the dense oracle.
MOE_CASES = (("dense", 1), ("sorted", 1), ("ragged", 1), ("sorted", 2), ("ragged", 2))


@nnx.jit
def _moe_outputs_and_grads(moe, x, cotangent):
  """{(impl, groups): (output, (param grads, x grad))} of <output, cotangent>, in one compile."""
  def run(impl, groups):
    def loss(moe, x):
      out, _ = moe(x, groups=groups, impl=impl)
      return jnp.sum(out * cotangent), out
    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(moe, x)
    return out, grads
  return {case: run(*case) for case in MOE_CASES}


@pytest.mark.parametrize("experts_per_token", [1, 2, 4])
def test_sparse_moe_matches_dense_oracle(experts_per_token):
  cfg = CFG.replace(experts_per_token=experts_per_token)
  moe = _randomize(MoE(cfg, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(2), (4, 6, cfg.hidden_size))  # 24 tokens, 2 groups of 12
  cotangent = jax.random.normal(jax.random.key(3), x.shape)
  results = _moe_outputs_and_grads(moe, x, cotangent)
  dense_out, (dense_params, dense_x) = results["dense", 1]
  for (impl, groups), (out, (params, grad_x)) in results.items():
    where = f"impl={impl} groups={groups} C={experts_per_token}"
    assert relative_error(out, dense_out) <= MOE_TOLERANCE, f"{where}: output"
    assert relative_error(grad_x, dense_x) <= MOE_TOLERANCE, f"{where}: grad x"
    for (path, grad), (_, dense_grad) in zip(nnx.to_flat_state(params),
                                             nnx.to_flat_state(dense_params)):
      # With C = 1 the router weight is softmax of one logit, 1: the router gets no gradient.
      err = relative_error(grad[...], dense_grad[...])
      assert err <= MOE_TOLERANCE, f"{where}: grad {'.'.join(map(str, path))} rel err {err:.2e}"


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def test_bfloat16_compute_stays_close_to_float32():
  model = _model()
  low = GptOss(CFG.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(low, nnx.state(model, nnx.Param))  # same float32 weights, bf16 compute
  tokens = jax.random.randint(jax.random.key(4), (2, LENGTH), 0, CFG.vocab_size)
  reference, ours = _logits(model, tokens), _logits(low, tokens)
  err = relative_error(ours, reference)
  print(f"\n[bf16 vs f32 logits] rel err {err:.2e}")
  assert err < BF16_TOLERANCE, f"bf16 logits rel err {err:.2e}"


@pytest.mark.parametrize("build, message", [
    (lambda: CFG.replace(num_attention_heads=6, num_key_value_heads=4),
     "num_attention_heads must be a multiple of num_key_value_heads=4"),
    (lambda: CFG.replace(num_experts=4, experts_per_token=5),
     "experts_per_token must be <= num_experts=4"),
    (lambda: CFG.replace(head_dim=16, rope_scaling_factor=32.0, initial_context_length=64),
     "must give YaRN ramp bounds 0 < low < high < head_dim/2 - 1"),
    (lambda: Gpt2Config(hidden_size=30, num_attention_heads=4),
     "hidden_size must be a multiple of num_attention_heads=4"),
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
def _preset_counts(preset: str) -> dict[str, int]:
  return param_counts(_abstract(GptOss, getattr(config, preset)))


@pytest.mark.parametrize("preset", ["SEED_MEDIUM", "GPT_OSS_20B"])
def test_full_size_parameter_counts(preset):
  counts = _preset_counts(preset)
  print(f"\n[params] {preset}: total {counts['total']:,}, active {counts['active']:,}")
  assert counts == _expected_gptoss_counts(getattr(config, preset))


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
  assert param_counts(model) == {"total": expected, "active": expected}
