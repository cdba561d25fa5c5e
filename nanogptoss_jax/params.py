"""Parameter counts of a model, real or abstract (`nnx.eval_shape`): total and active per token."""

import math

from flax import nnx

from nanogptoss_jax.gpt2 import Gpt2
from nanogptoss_jax.gptoss import GptOss

# The parameters that exist once per expert, stacked along a leading [E] axis.
EXPERT_PARAMS = ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias")


def _size(variable) -> int:
  # Shapes only, so an abstract model (ShapeDtypeStruct leaves) counts without being allocated.
  return math.prod(variable.shape)


def count_params(model: nnx.Module) -> int:
  """Number of scalars held in the model's nnx.Param variables."""
  return sum(_size(v) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _unused_expert_params(model: GptOss) -> int:
  """Parameters of the E - C experts a token does not visit, summed over layers."""
  cfg = model.cfg
  unused = cfg.num_experts - cfg.experts_per_token
  all_experts = sum(_size(getattr(block.mlp, name)) for block in model.blocks
                    for name in EXPERT_PARAMS)
  return all_experts * unused // cfg.num_experts


def param_counts(model: GptOss | Gpt2) -> dict[str, int]:
  """{"total": all parameters, "active": those one token's forward pass uses}.

  Active counts embedding and unembedding in full, as it does every non-expert parameter.
  OpenAI's model card leaves the embedding table out of its "active" figure (3.6B for
  gpt-oss-20b); ours is that plus vocab_size * hidden_size.
  """
  total = count_params(model)
  if isinstance(model, GptOss):
    return {"total": total, "active": total - _unused_expert_params(model)}
  if isinstance(model, Gpt2):
    return {"total": total, "active": total}
  raise TypeError(f"param_counts knows GptOss and Gpt2, not {type(model).__name__}")
