"""nanogptoss-jax: GPT-OSS (and a GPT-2 baseline) in JAX + Flax NNX.

The package is layered; each folder imports only from those below it:
commands -> experiments -> training -> sampling, interop -> data, model -> kernels.
"""

import importlib

# Public names and the module each lives in. Loaded on first use (PEP 562), so that light
# modules (cli, cpu_malloc: used before a command's heavy imports) don't pull in JAX.
_EXPORTS = {
    "ConfigError": "model.config", "GptOssConfig": "model.config", "Gpt2Config": "model.config",
    "GptOss": "model.gptoss", "Gpt2": "model.gpt2",
    "from_torch_state_dict": "interop.torch_reference",
    "to_torch_state_dict": "interop.torch_reference",
    "generate": "sampling.decode", "generate_text": "sampling.text",
    "load_checkpoint": "training.weights",
    "load_pretrained": "pretrained.load", "save_pretrained": "pretrained.export",
    "quantize": "model.quantize",
    "LoraConfig": "model.lora", "add_lora": "model.lora", "merge_lora": "model.lora_merge",
    "save_adapter": "interop.peft_adapter", "load_adapter": "interop.peft_adapter",
    "UserError": "errors",
    "render_chat": "chat.harmony", "parse_chat": "chat.harmony",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'nanogptoss_jax' has no attribute {name!r}")
  return getattr(importlib.import_module(f"nanogptoss_jax.{_EXPORTS[name]}"), name)


def __dir__():
  return __all__
