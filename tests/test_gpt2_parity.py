"""Our GPT-2 baseline against Hugging Face's GPT2LMHeadModel on shared random weights."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax import Gpt2, Gpt2Config
from tests.factories import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LOGITS_TOLERANCE = 1e-4
CONFIG = Gpt2Config(num_hidden_layers=2, vocab_size=64, hidden_size=32, num_attention_heads=4,
                    max_position_embeddings=32)
BATCH, LENGTH = 2, 24


def _hf_model(cfg: Gpt2Config, seed: int):
  """GPT2LMHeadModel built from a config (nothing downloaded), every parameter drawn at random."""
  hf_cfg = transformers.GPT2Config(
      n_embd=cfg.hidden_size, n_layer=cfg.num_hidden_layers, n_head=cfg.num_attention_heads,
      vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      layer_norm_epsilon=cfg.layer_norm_eps, bos_token_id=0, eos_token_id=0,
      # HF ties lm_head to wte by default; ours is untied, so the test must be too.
      tie_word_embeddings=False)
  model = transformers.GPT2LMHeadModel(hf_cfg).float().eval()
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.copy_(torch.from_numpy(_random_value(name, tuple(param.shape), rng).astype(np.float32)))
  return model


def _random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """Non-trivial LayerNorm affines and biases; matrices scaled so activations stay O(1)."""
  if ".ln_" in name and name.endswith("weight"):
    return 1.0 + rng.normal(0.0, 0.1, shape)
  if name.endswith("bias"):
    return rng.normal(0.0, 0.1, shape)
  if name.endswith(("wte.weight", "wpe.weight")):
    return rng.normal(0.0, 1.0, shape)
  # Conv1D weights are [in, out]; lm_head (a torch Linear) is [out, in].
  fan_in = shape[1] if name == "lm_head.weight" else shape[0]
  return rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)


def _hf_name(path: tuple) -> tuple[str, bool]:
  """(HF parameter name, transpose) for one of our parameter paths."""
  if path[0] == "unembedding":
    return "lm_head.weight", True  # torch Linear [V, D]; ours [D, V]
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[path[-1]]
  if path[0] == "blocks":
    # Module names below the block match HF's; nnx.Linear kernels are [in, out] like Conv1D.
    return ".".join(["transformer.h", str(path[1]), *map(str, path[2:-1]), leaf]), False
  return f"transformer.{path[0]}.{leaf}", False


def _load_hf_weights(cfg: Gpt2Config, hf_model) -> Gpt2:
  """Our Gpt2 holding the HF model's weights."""
  hf_params = {name: p.detach().numpy() for name, p in hf_model.named_parameters()}
  graphdef, params, rest = nnx.split(Gpt2(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
  flat = dict(nnx.to_flat_state(params))
  used = set()
  for path, variable in flat.items():
    name, transpose = _hf_name(path)
    value = hf_params[name].T if transpose else hf_params[name]
    assert value.shape == variable.shape, (path, name, value.shape, variable.shape)
    variable.set_value(jnp.asarray(value))
    used.add(name)
  assert used == set(hf_params), f"HF parameters left unmapped: {set(hf_params) - used}"
  return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def test_logits_match_hugging_face():
  hf_model = _hf_model(CONFIG, seed=0)
  model = _load_hf_weights(CONFIG, hf_model)
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, LENGTH))
  with torch.no_grad():
    theirs = hf_model(torch.as_tensor(tokens)).logits.numpy()
  ours = nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens, jnp.int32))
  err = relative_error(ours, theirs)
  print(f"\n[gpt2 logits] T={LENGTH}: rel err {err:.2e}")
  assert err <= LOGITS_TOLERANCE, f"GPT-2 logits rel err {err:.2e}"
