"""LoRA on GPT-OSS: adapters on attention's q, k, v, o and on every expert's two matrices.

`add_lora` attaches `model/adapters.LowRank` modules to each block (attention `lora_q` ...,
MoE `lora_mlp1`, `lora_mlp2`), stacked like the block's own weights in the scan layout; the
blocks add x·A·B to the matmuls they adapt, the experts' inside the dispatch for the selected
experts only. `merge_lora` folds the updates into the weights and drops the adapters.

The experts of only some layers may be adapted (`expert_layers`, as OpenAI's recipe adapts
layers 7, 15 and 23 of gpt-oss-20b). In the loop layout those blocks alone hold expert adapters;
in the scan layout, where every pair of a stack must hold the same parameters, they sit beside
the stacks in `blocks.lora_experts.{layer}` and the scan hands each pair its own
(`layer_stack.ScannedBlocks`).

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
  # The layers whose experts (mlp1, mlp2 targets) are adapted; () adapts every layer's.
  expert_layers: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    object.__setattr__(self, "expert_layers", tuple(self.expert_layers))
    layers = self.expert_layers
    if any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in layers) or \
        list(layers) != sorted(set(layers)):
      raise ConfigError(f"lora.expert_layers must be increasing layer numbers >= 0 (got "
                        f"{layers!r})")
    if layers and not set(self.targets) & set(adapters.EXPERT_TARGETS):
      raise ConfigError(f"lora.expert_layers={layers!r} picks layers for expert adapters, but "
                        f"lora.targets {self.targets!r} has neither mlp1 nor mlp2")
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

  def adapts_experts(self, layer: int) -> bool:
    """Whether layer `layer` gets expert adapters."""
    return (bool(set(self.targets) & set(adapters.EXPERT_TARGETS))
            and (not self.expert_layers or layer in self.expert_layers))

  def some_experts(self, num_layers: int) -> tuple[int, ...] | None:
    """The adapted expert layers when they are some but not all of the model's, else None."""
    layers = [layer for layer in range(num_layers) if self.adapts_experts(layer)]
    return tuple(layers) if layers and len(layers) < num_layers else None


def _block_groups(model: GptOss) -> list[tuple[nnx.Module, int | None, int | None]]:
  """(block, stack size or None, layer or None) for every block object: loop blocks (with
  their layer), or scanned stacks (the odd last block with its layer)."""
  if isinstance(model.blocks, ScannedBlocks):
    groups = []
    if model.blocks.pairs is not None:
      count = model.cfg.num_hidden_layers // 2
      groups += [(model.blocks.pairs.sliding, count, None), (model.blocks.pairs.full, count, None)]
    if model.blocks.last is not None:
      groups.append((model.blocks.last, None, model.cfg.num_hidden_layers - 1))
    return groups
  return [(block, None, layer) for layer, block in enumerate(model.blocks)]


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
  num_layers = model.cfg.num_hidden_layers
  beyond = [layer for layer in lora.expert_layers if layer >= num_layers]
  if beyond:
    raise ConfigError(f"lora.expert_layers {beyond} are beyond this model's {num_layers} layers")
  model.lora_config = lora  # static: what save_adapter writes and merge_lora checks
  rngs = nnx.Rngs(seed)
  shapes = _shapes(model.cfg)

  def low_rank(target: str, count: int | None) -> adapters.LowRank:
    expert_axis, fan_in, fan_out, logical = shapes[target]
    lead = ((count,) if count else ()) + ((model.cfg.num_experts,) if expert_axis else ())
    lead_axes = ((axes.LAYERS,) if count else ()) + ((axes.EXPERTS,) if expert_axis else ())
    # Adapters train in float32 whatever the base stores (as PEFT autocasts).
    return adapters.LowRank(fan_in, fan_out, rank=lora.rank, scale=lora.scale,
                            logical_axes=logical, lead=lead, lead_axes=lead_axes,
                            param_dtype=jnp.float32, rngs=rngs)

  some = lora.some_experts(num_layers)
  scanned = isinstance(model.blocks, ScannedBlocks)
  for block, count, layer in _block_groups(model):
    for target in lora.targets:
      is_expert = target in adapters.EXPERT_TARGETS
      if is_expert and (some if scanned else not lora.adapts_experts(layer)):
        continue  # scanned: beside the stacks (below); loop: only the chosen layers
      setattr(block.mlp if is_expert else block.attn, adapters.attribute(target),
              low_rank(target, count))
  if scanned and some:
    experts = {}
    for layer in some:
      owner = adapters.ExpertAdapters()
      for target in lora.targets:
        if target in adapters.EXPERT_TARGETS:
          setattr(owner, adapters.attribute(target), low_rank(target, None))
      experts[str(layer)] = owner
    model.blocks.lora_experts = nnx.Dict(experts)
  return model


def has_lora(model: nnx.Module) -> bool:
  return any(isinstance(m, adapters.LowRank) for _, m in nnx.iter_graph(model))


def lora_filter():
  """The nnx filter of adapter parameters (A and B of every adapter)."""
  return nnx.All(nnx.Param, lambda path, _: any(str(p).startswith("lora_") for p in path))
