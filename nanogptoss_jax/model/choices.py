"""Which implementation each `*_impl` field of the execution config picks: the one place where
the plain math of `model/` gives way to a fast path of `kernels/` (tests check each pair agrees).

`auto` picks what measured fastest on the platform the program is made for (`platform`: the
execution config's, "auto" meaning the backend JAX runs on); `plain` is the readable math.
"""

import jax

from nanogptoss_jax.kernels import moe_dispatch
from nanogptoss_jax.kernels import mxfp4 as kernel_mxfp4
from nanogptoss_jax.model import mxfp4 as plain_mxfp4

# kernels.attention, .flash_attention, .pallas_attention, .splash_attention
ATTENTION_IMPLS = ("auto", "plain", "blocked", "flash", "pallas", "splash")
MATMUL_IMPLS = ("auto", "plain", "transposed_grad")  # transposed_grad: kernels.matmul
LOSS_IMPLS = ("auto", "plain", "fused", "chunked")  # kernels.cross_entropy, .chunked_*
MOE_IMPLS = ("auto", "dense", "sorted", "looped", "ragged")  # dense is the plain one
EXPERT_FORMATS = ("float", "mxfp4")  # mxfp4: model/mxfp4.py
DENSE_FORMATS = ("float", "int8")  # int8: model/int8.py
MXFP4_IMPLS = ("auto", "plain", "bits")  # bits: kernels.mxfp4
# Rematerialisation in training (model/gptoss.py): none; each block recomputed in the backward
# pass; or each block recomputed except the outputs of its matmuls (model/layers.py names them).
REMAT_POLICIES = ("none", "block", "matmuls")
# How the blocks are stored and run (model/layer_stack.py): one Block per layer, or the
# (sliding, full) pairs stacked and scanned so compile time does not grow with depth.
LAYERS_IMPLS = ("auto", "loop", "scan")
MATMUL_OUTPUT = "matmul_output"

# The sorted dispatch moves each block's expert weights about three times (the gather reads and
# writes them, the matmul reads the copy); the dense one reads every expert's weights once.
SORTED_WEIGHT_PASSES = 3


# `auto` keeps the blocked kernel while its saved probabilities stay small (it is faster on the
# CPU there: docs/benchmarks.md) and switches to flash attention, whose memory grows with T
# instead of T * S, from this many (query, key) pairs per sequence on.
FLASH_FROM_PAIRS = 1024 * 1024


def target_platform(platform: str = "auto") -> str:
  """"cpu", "gpu" or "tpu": `platform`, or with "auto" the backend JAX runs on."""
  return jax.default_backend() if platform == "auto" else platform


def attention_impl(name: str, queries: int = 0, keys: int = 0, in_order: bool = False,
                   platform: str = "auto") -> str:
  if name != "auto":
    return name
  # On a TPU, JAX's splash kernel serves training (keys = the queries in order); it takes sinks.
  # The Pallas GPU kernel is equal to the plain attention in interpret mode but has not been
  # timed on a GPU (benchmarks/gpu_check.sh), so GPUs keep the plain-JAX flash kernel.
  if target_platform(platform) == "tpu" and in_order and queries == keys:
    return "splash"
  return "flash" if queries * keys >= FLASH_FROM_PAIRS else "blocked"


# `auto` scans from this depth on: below it the loop compiles quickly anyway.
SCAN_FROM_LAYERS = 8


def layers_impl(name: str, num_layers: int) -> str:
  if name != "auto":
    return name
  return "scan" if num_layers >= SCAN_FROM_LAYERS else "loop"


def matmul_impl(name: str) -> str:
  return "transposed_grad" if name == "auto" else name


# `auto` keeps the fused loss (fastest on the CPU) while its saved [N, V] float32
# exponentials stay under this size, and goes to the chunked one beyond.
CHUNKED_LOSS_FROM_BYTES = 1 << 30


def loss_impl(name: str, tokens: int = 0, vocab: int = 0) -> str:
  if name != "auto":
    return name
  return "chunked" if 4 * tokens * vocab > CHUNKED_LOSS_FROM_BYTES else "fused"


def mxfp4_decode(name: str):
  """The MXFP4 decode a config's `mxfp4_impl` picks (both give bit-equal values)."""
  return plain_mxfp4.decode if name == "plain" else kernel_mxfp4.decode


def decode_selected(tokens: int, num_experts: int, per_token: int) -> bool:
  """With MXFP4 experts: decode only the experts the sorted dispatch's blocks pick when that is
  fewer than all of them (a decode step), else decode every expert once (a prefill)."""
  assignments = tokens * per_token
  return moe_dispatch.num_blocks(assignments, num_experts) < num_experts


# `auto` runs the sorted dispatch's blocks in a loop (`looped`) once the copies of every block's
# expert weights that its batched matmul takes would exceed this size.
LOOPED_FROM_BYTES = 1 << 30


def moe_impl(name: str, tokens: int, num_experts: int, per_token: int,
             expert_bytes: int = 0) -> str:
  """`auto`: `dense` when it moves fewer weights and computes no more rows than `sorted`;
  `looped` when sorted's weight copies (`expert_bytes`: one expert's) would pass a gigabyte.

  `sorted` is the fastest dispatch measured (CPU, H100) for many tokens; `ragged_dot`'s
  backward pass scatters, slowly on both. A decode step has a handful of tokens: its blocks are
  mostly padding, and weight traffic decides. docs/benchmarks.md has the numbers.
  """
  if name != "auto":
    return name
  assignments = tokens * per_token
  blocks = moe_dispatch.num_blocks(assignments, num_experts)
  if blocks * expert_bytes > LOOPED_FROM_BYTES:
    return "looped"
  fewer_weights = num_experts <= SORTED_WEIGHT_PASSES * blocks
  fewer_rows = tokens * num_experts <= blocks * moe_dispatch.block_rows(assignments, num_experts)
  return "dense" if fewer_weights and fewer_rows else "sorted"
