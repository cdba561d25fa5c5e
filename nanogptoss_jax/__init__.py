"""nanogptoss-jax: GPT-OSS (and a GPT-2 baseline) in JAX + Flax NNX."""

import importlib

# Public names and the module each lives in. Loaded on first use (PEP 562), so that light
# modules (e.g. cpu_malloc, used before a script's heavy imports) don't pull in JAX.
_EXPORTS = {
    "ConfigError": "config", "GptOssConfig": "config", "Gpt2Config": "config",
    "GptOss": "gptoss", "Gpt2": "gpt2",
    "from_torch_state_dict": "interop", "to_torch_state_dict": "interop",
    "generate": "sampling", "generate_text": "sampling",
    "load_checkpoint": "checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'nanogptoss_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(f"nanogptoss_jax.{_EXPORTS[name]}"), name)


def __dir__():
  return __all__
