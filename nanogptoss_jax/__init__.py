"""nanogptoss-jax: GPT-OSS (and a GPT-2 baseline) in JAX + Flax NNX."""

from nanogptoss_jax.checkpoint import load_checkpoint
from nanogptoss_jax.config import ConfigError, Gpt2Config, GptOssConfig
from nanogptoss_jax.gpt2 import Gpt2
from nanogptoss_jax.gptoss import GptOss
from nanogptoss_jax.interop import from_torch_state_dict, to_torch_state_dict
from nanogptoss_jax.sampling import generate, generate_text

__all__ = ["ConfigError", "Gpt2", "Gpt2Config", "GptOss", "GptOssConfig", "from_torch_state_dict",
           "generate", "generate_text", "load_checkpoint", "to_torch_state_dict"]
