"""Which implementation each `*_impl` config field picks: the one place where the plain math of
`model/` gives way to a fast path of `kernels/` (tests check each pair agrees).

`auto` picks what measured fastest on CPU and GPU alike; `plain` is the readable math.
"""

from nanogptoss_jax.kernels import moe_dispatch

ATTENTION_IMPLS = ("auto", "plain", "blocked")  # blocked: kernels.attention
MATMUL_IMPLS = ("auto", "plain", "transposed_grad")  # transposed_grad: kernels.matmul
LOSS_IMPLS = ("auto", "plain", "fused")  # fused: kernels.cross_entropy
MOE_IMPLS = ("auto", "dense", "sorted", "ragged")  # dense is the plain one

# The sorted dispatch moves each block's expert weights about three times (the gather reads and
# writes them, the matmul reads the copy); the dense one reads every expert's weights once.
SORTED_WEIGHT_PASSES = 3


def attention_impl(name: str) -> str:
  return "blocked" if name == "auto" else name


def matmul_impl(name: str) -> str:
  return "transposed_grad" if name == "auto" else name


def loss_impl(name: str) -> str:
  return "fused" if name == "auto" else name


def moe_impl(name: str, tokens: int, num_experts: int, per_token: int) -> str:
  """`auto`: `dense` when it moves fewer weights and computes no more rows than `sorted`.

  `sorted` is the fastest dispatch measured (CPU, H100) for many tokens; `ragged_dot`'s
  backward pass scatters, slowly on both. A decode step has a handful of tokens: its blocks are
  mostly padding, and weight traffic decides. docs/benchmarks.md has the numbers.
  """
  if name != "auto":
    return name
  assignments = tokens * per_token
  blocks = moe_dispatch.num_blocks(assignments, num_experts)
  fewer_weights = num_experts <= SORTED_WEIGHT_PASSES * blocks
  fewer_rows = tokens * num_experts <= blocks * moe_dispatch.block_rows(assignments, num_experts)
  return "dense" if fewer_weights and fewer_rows else "sorted"
