"""Test helpers (not tests): OpenAI's reference GPT-OSS with deterministic random weights."""

import dataclasses
import math

import numpy as np
import pytest

import nanogptoss_jax

# Spreads of the random weights. Matrices use 1/sqrt(fan_in) so every projection's output is
# O(1): attention scores are neither uniform nor one-hot, router logits differ by O(1) (routing
# is not degenerate) and logits are O(1). Biases, sinks and norm scales get noticeably
# non-trivial values so a missed bias, sink or scale shows up in the logits.
SINK_STD = 1.0
BIAS_STD = 0.1
SCALE_STD = 0.1
EMBEDDING_STD = 1.0


def reference_model_module():
  """`gpt_oss.torch.model`, imported lazily; skips the calling test without torch or gpt-oss."""
  pytest.importorskip("torch")
  return pytest.importorskip("gpt_oss.torch.model")


def reference_config(cfg: nanogptoss_jax.GptOssConfig):
  """The reference ModelConfig holding the same hyper-parameters as our config."""
  ModelConfig = reference_model_module().ModelConfig
  return ModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)})


def random_value(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """A draw for reference parameter `name`, spread chosen by what the parameter does."""
  if name.endswith("sinks"):
    return rng.normal(0.0, SINK_STD, shape)
  if name.endswith("scale"):
    return 1.0 + rng.normal(0.0, SCALE_STD, shape)
  if name.endswith("bias"):
    return rng.normal(0.0, BIAS_STD, shape)
  if name == "embedding.weight":
    return rng.normal(0.0, EMBEDDING_STD, shape)
  # Linear weights are [out, in] and expert weights [E, out, in]: fan-in is the last axis.
  return rng.normal(0.0, 1.0 / math.sqrt(shape[-1]), shape)


def build_reference(cfg: nanogptoss_jax.GptOssConfig, seed: int = 0):
  """A float32 reference Transformer for `cfg`, every parameter drawn from a seeded generator."""
  torch = pytest.importorskip("torch")
  model = reference_model_module().Transformer(reference_config(cfg))
  rng = np.random.default_rng(seed)
  with torch.no_grad():
    # The reference allocates bf16 params with torch.empty (garbage): cast to float32 first so
    # the draws are stored exactly, then overwrite every one of them.
    model.float()
    for name, param in model.named_parameters():
      param.copy_(torch.from_numpy(random_value(name, tuple(param.shape), rng).astype(np.float32)))
  return model.eval()


def reference_state_dict(model) -> dict[str, np.ndarray]:
  """The reference's parameters as float32 numpy arrays, keyed by reference name."""
  return {name: value.detach().float().numpy() for name, value in model.state_dict().items()}


def run_reference(model, tokens: np.ndarray) -> np.ndarray:
  """Logits [B, T, V] from the unbatched reference, one row of tokens [B, T] at a time."""
  torch = pytest.importorskip("torch")
  with torch.no_grad():
    return np.stack([model(torch.as_tensor(row, dtype=torch.long)).numpy() for row in tokens])


def random_tokens(cfg: nanogptoss_jax.GptOssConfig, batch: int, length: int,
                  seed: int = 0) -> np.ndarray:
  """Token ids [B, T]; rows differ so that batching bugs cannot hide."""
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, length), dtype=np.int32)
