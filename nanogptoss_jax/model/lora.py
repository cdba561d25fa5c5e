"""LoRA on GPT-OSS: adapters on attention's q, k, v, o and on every expert's two matrices.

`add_lora` attaches `model/adapters.LowRank` modules to each block (attention `lora_q` ...,
MoE `lora_mlp1`, `lora_mlp2`), stacked like the block's own weights in the scan layout; the
blocks add x·A·B to the matmuls they adapt, the experts' inside the dispatch for the selected
experts only. `merge_lora` folds the updates into the weights and drops the adapters.

Why our own and not `flax.nnx.LoRA` or qwix: nnx.LoRA wraps one `nnx.Linear` (no expert axis,
no slices of a fused qkv), and qwix intercepts `dot_general`/`einsum` calls of modules, which
cannot see an expert's parameters inside the sorted/ragged dispatch (gathers of weight blocks,
`ragged_dot`, custom VJPs) nor MXFP4 blocks decoded in the step.
"""

import dataclasses

import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model import adapters, axes
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.layer_stack import ScannedBlocks

TARGETS = adapters.ATTENTION_TARGETS + adapters.EXPERT_TARGETS
# The trainable-parameter pattern (training/state.trainable_filter) of adapters only.
LORA_PATTERN = r"\blora_"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Rank r, alpha (updates scale by alpha / r, as PEFT without rsLoRA) and the adapted matrices:
  attention's q, k, v, o projections and the experts' mlp1 (gate/up) and mlp2 (down)."""

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = TARGETS
  dropout: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0):
      raise ConfigError(f"lora.rank must be a positive integer (got {self.rank!r})")
    if not self.alpha > 0:
      raise ConfigError(f"lora.alpha must be > 0 (got {self.alpha!r})")
    unknown = [t for t in self.targets if t not in TARGETS]
    if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
      raise ConfigError(f"lora.targets must be distinct names from {TARGETS} (got "
                        f"{self.targets!r})")
    if self.dropout != 0.0:
      # As PEFT's expert adapters: dropout on x cannot be factored out of x·A·B per expert.
      raise ConfigError(f"lora.dropout={self.dropout} is not supported; use 0.0")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _block_groups(model: GptOss) -> list[tuple[nnx.Module, int | None]]:
  """(block, stack size or None) for every block object: loop blocks, or scanned stacks."""
  if isinstance(model.blocks, ScannedBlocks):
    groups = []
    if model.blocks.pairs is not None:
      count = model.cfg.num_hidden_layers // 2
      groups += [(model.blocks.pairs.sliding, count), (model.blocks.pairs.full, count)]
    if model.blocks.last is not None:
      groups.append((model.blocks.last, None))
    return groups
  return [(block, None) for block in model.blocks]


def _shapes(cfg) -> dict:
  """target -> (expert axis?, in, out, logical (in, out))."""
  q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  d, f = cfg.hidden_size, cfg.intermediate_size
  return {"q": (False, d, q, (axes.EMBED, axes.QKV)), "k": (False, d, kv, (axes.EMBED, axes.QKV)),
          "v": (False, d, kv, (axes.EMBED, axes.QKV)), "o": (False, q, d, (axes.Q_HEADS, axes.EMBED)),
          "mlp1": (True, d, 2 * f, (axes.EMBED, axes.EXPERT_MLP)),
          "mlp2": (True, f, d, (axes.EXPERT_MLP, axes.EMBED))}


def add_lora(model: GptOss, lora: LoraConfig, *, seed: int = 0) -> GptOss:
  """Attaches fresh adapters (A random, B zero: the model still computes its base exactly) to
  `model` in place and returns it; `seed` draws the A matrices."""
  if not isinstance(model, GptOss):
    raise ConfigError(f"add_lora needs a GPT-OSS model, got {type(model).__name__}")
  if has_lora(model):
    raise ConfigError("add_lora: the model has adapters already (merge_lora folds them in)")
  model.lora_config = lora  # static: what save_adapter writes and merge_lora checks
  rngs = nnx.Rngs(seed)
  dtype = jnp.float32  # adapters train in float32 whatever the base stores (as PEFT autocasts)
  shapes = _shapes(model.cfg)
  for block, count in _block_groups(model):
    for target in lora.targets:
      expert_axis, fan_in, fan_out, logical = shapes[target]
      lead = ((count,) if count else ()) + ((model.cfg.num_experts,) if expert_axis else ())
      lead_axes = ((axes.LAYERS,) if count else ()) + ((axes.EXPERTS,) if expert_axis else ())
      owner = block.mlp if expert_axis else block.attn
      setattr(owner, adapters.attribute(target), adapters.LowRank(
          fan_in, fan_out, rank=lora.rank, scale=lora.scale, logical_axes=logical, lead=lead,
          lead_axes=lead_axes, param_dtype=dtype, rngs=rngs))
  return model


def has_lora(model: nnx.Module) -> bool:
  return any(isinstance(m, adapters.LowRank) for _, m in nnx.iter_graph(model))


def lora_filter():
  """The nnx filter of adapter parameters (A and B of every adapter)."""
  return nnx.All(nnx.Param, lambda path, _: any(str(p).startswith("lora_") for p in path))
