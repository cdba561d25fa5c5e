"""Our GPT-OSS against OpenAI's torch reference on shared random weights: logits, every block's
hidden state, gradients, and the state-dict conversion both ways."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import GptOssConfig, from_torch_state_dict, to_torch_state_dict
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.rope import rope_tables
from nanogptoss_jax.training.losses import token_losses
from tests.factories import relative_error
from tests.reference import build_reference, random_tokens, reference_state_dict, run_reference

torch = pytest.importorskip("torch")

LOGITS_TOLERANCE = 1e-5
HIDDEN_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
BATCH = 2
SLIDING_WINDOW = 8
# Shorter than the window (sliding layers see everything) and longer (they must drop keys).
LENGTHS = (5, 20)

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=24, head_dim=16,
             num_attention_heads=4, num_experts=4, sliding_window=SLIDING_WINDOW)
# YaRN with head_dim 16 and factor 32 needs initial_context_length >= ~200 for a valid ramp.
_YARN = dict(rope_scaling_factor=32.0, initial_context_length=256, rope_theta=10000.0)
CONFIGS = {
    # Multi-head (G = 1), top-1 routing, plain RoPE.
    "mha-top1-rope": GptOssConfig(**_TINY, num_hidden_layers=2, num_key_value_heads=4,
                                  experts_per_token=1, rope_scaling_factor=1.0),
    # G = 2, top-2 of 4, YaRN, three layers (sliding, full, sliding).
    "gqa2-top2-yarn": GptOssConfig(**_TINY, **_YARN, num_hidden_layers=3, num_key_value_heads=2,
                                   experts_per_token=2),
    # G = 4 (one kv head), every expert, YaRN; a low swiglu_limit so the clamp really bites.
    "gqa4-topall-yarn-clamp": GptOssConfig(**_TINY, **_YARN, num_hidden_layers=2,
                                           num_key_value_heads=1, experts_per_token=4,
                                           swiglu_limit=1.0),
}


def _parity_case(cfg: GptOssConfig, length: int, execution: ExecutionConfig | None = None,
                 seed: int = 0):
  """(our model, reference model, tokens [B, T]) sharing seeded random weights."""
  reference = build_reference(cfg, seed)
  model = from_torch_state_dict(cfg, reference_state_dict(reference), execution)
  return model, reference, random_tokens(cfg, BATCH, length, seed)


@nnx.jit
def _forward(model, tokens):
  """(logits [B, T, V] from model(tokens), the residual stream after each block [L, B, T, D])."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  rope = rope_tables(model.cfg, positions)
  x = model.embedding(tokens)
  states = []
  for block in model.blocks:
    x, _, _ = block(x, positions, rope)
    states.append(x)
  return model(tokens), jnp.stack(states)


def _reference_forward(reference, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(logits [B, T, V], the residual stream after each block [L, B, T, D]), row by row."""
  hidden = []
  with torch.no_grad():
    for row in tokens:
      x = reference.embedding(torch.as_tensor(row, dtype=torch.long))
      states = []
      for block in reference.block:
        x = block(x)
        states.append(x.numpy())
      hidden.append(np.stack(states))
  return run_reference(reference, tokens), np.stack(hidden, axis=1)


@functools.cache
def _both_forwards(cfg: GptOssConfig, length: int, execution: ExecutionConfig | None = None):
  """((our logits, hidden), (reference logits, hidden)) on shared weights, once per case: the
  logits and per-block tests share one compile."""
  model, reference, tokens = _parity_case(cfg, length, execution)
  ours = jax.tree.map(np.asarray, _forward(model, jnp.asarray(tokens)))
  return ours, _reference_forward(reference, tokens)


@nnx.jit
def _loss_and_grads(model, tokens):
  """The trainer's own loss (fused unembedding cross-entropy, hand-written backward pass)."""
  return nnx.value_and_grad(lambda m: token_losses(m, tokens)[0].mean())(model)


def _reference_loss_and_grads(reference, tokens: np.ndarray):
  """Same loss through the reference (mean over rows of per-row means: rows are equally long)."""
  reference.zero_grad()
  losses = []
  for row in tokens:
    row = torch.as_tensor(row, dtype=torch.long)
    losses.append(torch.nn.functional.cross_entropy(reference(row)[:-1], row[1:]))
  loss = torch.stack(losses).mean()
  loss.backward()
  return loss.item(), {name: p.grad.numpy() for name, p in reference.named_parameters()}


def _grads_as_state_dict(model, grads) -> dict[str, np.ndarray]:
  """Our gradients under reference names and layouts, via the same table the weights use."""
  graphdef, _ = nnx.split(model)
  return to_torch_state_dict(nnx.merge(graphdef, grads))


def _check_logits(cfg: GptOssConfig, length: int, label: str,
                  execution: ExecutionConfig | None = None) -> None:
  """Asserts (and prints) our logits against the reference's for one case."""
  (ours, _), (theirs, _) = _both_forwards(cfg, length, execution)
  err = relative_error(ours, theirs)
  print(f"\n[logits] {label}: rel err {err:.2e}")
  assert err <= LOGITS_TOLERANCE, f"{label}: logits rel err {err:.2e}"


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_reference(name, length):
  _check_logits(CONFIGS[name], length, f"{name} T={length}")


@pytest.mark.parametrize("moe_impl", ["sorted", "ragged", "dense"])
def test_logits_match_reference_for_each_moe_impl(moe_impl):
  _check_logits(CONFIGS["gqa2-top2-yarn"], max(LENGTHS),
                f"gqa2-top2-yarn T={max(LENGTHS)} moe_impl={moe_impl}",
                ExecutionConfig(moe_impl=moe_impl))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_block_matches_reference(name):
  (_, ours), (_, theirs) = _both_forwards(CONFIGS[name], max(LENGTHS))
  for i, (h_ours, h_ref) in enumerate(zip(ours, theirs)):
    err = relative_error(h_ours, h_ref)
    print(f"\n[hidden] {name} block {i}: rel err {err:.2e}")
    assert err <= HIDDEN_TOLERANCE, f"{name}: block {i} hidden state rel err {err:.2e}"


# Scanned layers too: three layers are one scanned (sliding, full) pair and a last block.
@pytest.mark.parametrize("name,layers", [("gqa2-top2-yarn", "loop"), ("gqa2-top2-yarn", "scan"),
                                         ("gqa4-topall-yarn-clamp", "loop")])
def test_gradients_match_reference(name, layers):
  model, reference, tokens = _parity_case(CONFIGS[name], max(LENGTHS),
                                          ExecutionConfig(layers_impl=layers))
  loss, grads = _loss_and_grads(model, jnp.asarray(tokens))
  ours = _grads_as_state_dict(model, grads)
  ref_loss, theirs = _reference_loss_and_grads(reference, tokens)
  assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (float(loss), ref_loss)
  assert ours.keys() == theirs.keys()
  worst = 0.0
  for param, ref_grad in theirs.items():
    err = relative_error(ours[param], ref_grad)  # an all-zero ref grad must be all-zero here too
    worst = max(worst, err)
    assert err <= GRAD_TOLERANCE, f"{name}: grad of {param} rel err {err:.2e}"
  print(f"\n[grads] {name}: loss {ref_loss:.4f}, worst per-parameter rel err {worst:.2e}")


def _small_state_dict(cfg: GptOssConfig) -> dict[str, np.ndarray]:
  return reference_state_dict(build_reference(cfg, seed=1))


def _assert_same_state_dict(actual: dict, expected: dict) -> None:
  assert actual.keys() == expected.keys()
  for name, value in expected.items():
    assert actual[name].dtype == np.float32, name
    np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_state_dict_round_trip_is_exact():
  cfg = CONFIGS["gqa2-top2-yarn"]
  state_dict = _small_state_dict(cfg)  # numpy arrays
  _assert_same_state_dict(to_torch_state_dict(from_torch_state_dict(cfg, state_dict)), state_dict)


def test_loading_accepts_torch_tensors_float32_and_bfloat16():
  cfg = CONFIGS["gqa2-top2-yarn"]
  state_dict = _small_state_dict(cfg)
  as_float32 = {name: torch.from_numpy(value) for name, value in state_dict.items()}
  _assert_same_state_dict(to_torch_state_dict(from_torch_state_dict(cfg, as_float32)), state_dict)
  as_bfloat16 = {name: value.bfloat16() for name, value in as_float32.items()}
  rounded = {name: value.float().numpy() for name, value in as_bfloat16.items()}
  _assert_same_state_dict(to_torch_state_dict(from_torch_state_dict(cfg, as_bfloat16)), rounded)


def test_loading_a_mismatched_state_dict_names_the_problem():
  cfg = CONFIGS["gqa2-top2-yarn"]
  state_dict = _small_state_dict(cfg)
  missing = {k: v for k, v in state_dict.items() if k != "block.1.attn.sinks"}
  with pytest.raises(KeyError, match=r"1 missing \['block\.1\.attn\.sinks'\]"):
    from_torch_state_dict(cfg, missing)
  with pytest.raises(KeyError, match=r"unexpected \['block\.9\.attn\.sinks'\]"):
    from_torch_state_dict(cfg, {**state_dict, "block.9.attn.sinks": state_dict["block.1.attn.sinks"]})
  # A config with fewer layers than the checkpoint: the extra layer's names are unexpected.
  with pytest.raises(KeyError, match=r"unexpected \['block\.2\."):
    from_torch_state_dict(cfg.replace(num_hidden_layers=2), state_dict)
  wrong_shape = {**state_dict, "block.0.mlp.mlp1_bias": np.zeros((4, 7), np.float32)}
  with pytest.raises(ValueError, match=r"block\.0\.mlp\.mlp1_bias: \(4, 7\), the config needs"):
    from_torch_state_dict(cfg, wrong_shape)
  # A prefixed state dict (e.g. saved from a wrapper module) gets told what to strip.
  with pytest.raises(KeyError, match=r"every key starts with 'model\.': strip that prefix"):
    from_torch_state_dict(cfg, {"model." + name: value for name, value in state_dict.items()})
