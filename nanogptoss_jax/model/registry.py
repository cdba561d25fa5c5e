"""The one place that knows which kind of model each config builds, and the kinds' saved names."""

from flax import nnx

from nanogptoss_jax.model.config import Gpt2Config, GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gpt2 import Gpt2
from nanogptoss_jax.model.gptoss import GptOss

# kind (the name a saved config records) -> (config class, model class)
MODELS = {"gpt_oss": (GptOssConfig, GptOss), "gpt2": (Gpt2Config, Gpt2)}
ModelConfig = GptOssConfig | Gpt2Config


def kind_of(cfg: ModelConfig) -> str:
  for kind, (config_class, _) in MODELS.items():
    if type(cfg) is config_class:
      return kind
  raise TypeError(f"no model kind has config class {type(cfg).__name__}")


def config_class(kind: str) -> type:
  return MODELS[kind][0]


def build_model(cfg: ModelConfig, seed: int = 0,
                execution: ExecutionConfig | None = None) -> GptOss | Gpt2:
  return MODELS[kind_of(cfg)][1](cfg, execution=execution, rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, execution: ExecutionConfig | None = None) -> GptOss | Gpt2:
  """The model's structure with ShapeDtypeStructs for leaves: nothing is allocated."""
  return nnx.eval_shape(lambda: build_model(cfg, execution=execution))
