"""Our parameter paths <-> tensor names of both published layouts.

The original layout uses the reference names (`interop.torch_reference.param_table`); Hugging
Face's splits qkv into q/k/v projections and renames the rest. Each entry: the names whose
tensors concatenate (axis 0, before any transpose) into our parameter, and whether the last two
axes swap. MXFP4 expert matrices map to a (blocks, scales) pair instead.
"""

from nanogptoss_jax.interop.torch_reference import param_table
from nanogptoss_jax.pretrained.layout import ORIGINAL

HF_GLOBAL = {
    ("embedding", "embedding"): (("model.embed_tokens.weight",), False),
    ("norm", "scale"): (("model.norm.weight",), False),
    ("unembedding", "kernel"): (("lm_head.weight",), True),
}
HF_LAYER = {  # our path inside block i -> (names under model.layers.{i}., transpose)
    "attn.norm.scale": (("input_layernorm.weight",), False),
    "attn.qkv.kernel": (("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                         "self_attn.v_proj.weight"), True),
    "attn.qkv.bias": (("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                       "self_attn.v_proj.bias"), False),
    "attn.sinks": (("self_attn.sinks",), False),
    "attn.out.kernel": (("self_attn.o_proj.weight",), True),
    "attn.out.bias": (("self_attn.o_proj.bias",), False),
    "mlp.norm.scale": (("post_attention_layernorm.weight",), False),
    "mlp.router.kernel": (("mlp.router.weight",), True),
    "mlp.router.bias": (("mlp.router.bias",), False),
    # Hugging Face stores dequantized experts as [E, in, out], our layout.
    "mlp.mlp1_weight": (("mlp.experts.gate_up_proj",), False),
    "mlp.mlp1_bias": (("mlp.experts.gate_up_proj_bias",), False),
    "mlp.mlp2_weight": (("mlp.experts.down_proj",), False),
    "mlp.mlp2_bias": (("mlp.experts.down_proj_bias",), False),
}
EXPERT_MATRICES = ("mlp1", "mlp2")
HF_EXPERT_NAMES = {"mlp1": "mlp.experts.gate_up_proj", "mlp2": "mlp.experts.down_proj"}


def float_table(layout: str, num_layers: int) -> dict[tuple, tuple[tuple[str, ...], bool]]:
  """Our path (tuple) -> (source names, transpose) for every float parameter."""
  if layout == ORIGINAL:
    return {path: ((name,), swap) for path, (name, swap) in param_table(num_layers).items()}
  table = dict(HF_GLOBAL)
  for i in range(num_layers):
    for ours, (names, swap) in HF_LAYER.items():
      table[("blocks", i, *ours.split("."))] = (tuple(f"model.layers.{i}.{n}" for n in names), swap)
  return table


def mxfp4_names(layout: str, layer: int, matrix: str) -> tuple[str, str]:
  """(blocks name, scales name) of expert matrix `mlp1` or `mlp2` in `layer`."""
  if layout == ORIGINAL:
    return f"block.{layer}.mlp.{matrix}_weight.blocks", f"block.{layer}.mlp.{matrix}_weight.scales"
  base = f"model.layers.{layer}.{HF_EXPERT_NAMES[matrix]}"
  return f"{base}_blocks", f"{base}_scales"


def expert_path(path: tuple) -> tuple[int, str, str] | None:
  """(layer, matrix, "weight" | "blocks" | "scales") if path is an expert matrix, else None."""
  if len(path) == 4 and path[0] == "blocks" and path[2] == "mlp":
    matrix, _, part = path[3].partition("_")
    if matrix in EXPERT_MATRICES and part in ("weight", "blocks", "scales"):
      return path[1], matrix, part
  return None
