"""Builds a model from its config: the one place that knows which config means which class."""

from flax import nnx

from nanogptoss_jax.config import Gpt2Config, GptOssConfig
from nanogptoss_jax.gpt2 import Gpt2
from nanogptoss_jax.gptoss import GptOss

MODEL_CLASSES = {GptOssConfig: GptOss, Gpt2Config: Gpt2}


def build_model(cfg: GptOssConfig | Gpt2Config, seed: int = 0) -> GptOss | Gpt2:
  return MODEL_CLASSES[type(cfg)](cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: GptOssConfig | Gpt2Config) -> GptOss | Gpt2:
  """The model's structure with ShapeDtypeStructs for leaves: nothing is allocated."""
  return nnx.eval_shape(lambda: build_model(cfg))
