"""Sparse MoE dispatch: each token's C experts only, O(experts_per_token) work (twin: the dense
`model.moe.dense_experts`, every expert on every token).

`sorted_experts` groups the token-expert assignments by expert into fixed-size row blocks and
runs one batched matmul over the blocks; `looped_experts` runs the same blocks one at a time, so
that one block's expert weights exist at once (decoded, for MXFP4 experts); `ragged_experts`
groups the same way and calls `jax.lax.ragged_dot`. Row gathers whose backward passes are
gathers too (`take_rows`) stand in for autodiff's scatter-adds, which run slowly on a CPU.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

# Rows per block in the sorted dispatch: about a quarter of the average group, within bounds.
# Bigger blocks copy expert weights fewer times; smaller ones waste fewer padded rows.
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 8, 512


def _rows_or_zeros(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x[rows], with a zero row wherever an index is out of range."""
  return x.at[rows].get(mode="fill", fill_value=0)


@jax.custom_vjp
def take_rows(x: jax.Array, rows: jax.Array, readers: jax.Array) -> jax.Array:
  """x [M, D] -> x[rows] [len(rows), D], a zero row for an index of M (a padding row).

  readers [M, K] must list, for each row of x, every output row that reads it (padded with
  len(rows)). The backward pass then gathers each row's K gradients and sums them, where
  autodiff of a gather scatter-adds.
  """
  return _rows_or_zeros(x, rows)


def _take_rows_forward(x, rows, readers):
  return _rows_or_zeros(x, rows), readers


def _take_rows_backward(readers, upstream):
  return _rows_or_zeros(upstream, readers).sum(axis=1), None, None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def with_update(y: jax.Array, x: jax.Array, a: jax.Array | None, b: jax.Array | None,
                matmul: Callable = jnp.matmul) -> jax.Array:
  """y + x A B (a LoRA update with its scale in B, `model/adapters.py`); y without one.

  x [.., R, in] times A [.., in, r] then B [.., r, out]: the rank-r product per expert is never
  formed, so no [E, in, out] weight delta exists."""
  if a is None:
    return y
  return y + matmul(matmul(x, a), b).astype(y.dtype)


def sort_assignments(top_experts: jax.Array):
  """Sorts the M * C token-expert assignments by expert: (order, expert, token) each [A]."""
  flat = top_experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  return order, flat[order], order // top_experts.shape[1]


def combine(y: jax.Array, top_weights: jax.Array) -> jax.Array:
  """Expert outputs [M * C, D] in assignment order (token n's c-th at n * C + c) -> [M, D],
  each token's C outputs summed with its router weights [M, C]."""
  num_tokens, per_token = top_weights.shape
  y = y.reshape(num_tokens, per_token, -1).astype(jnp.float32)  # [M, C, D]
  return jnp.einsum("mcd,mc->md", y, top_weights)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Which buffer row holds each token-expert assignment, and which expert each block uses."""

  source: jax.Array  # [rows] token copied into each buffer row; M (a zero row) for padding
  row: jax.Array  # [M, C] buffer row of token n's c-th assignment
  assignment: jax.Array  # [rows, 1] flat assignment n * C + c in each row; M * C for padding
  block_expert: jax.Array  # [blocks]
  rows_per_block: int
  num_rows: int


def block_plan(top_experts: jax.Array, num_experts: int) -> BlockPlan:
  """Lays out assignments so that every block of R rows belongs to a single expert."""
  num_tokens, per_token = top_experts.shape
  assignments = top_experts.size
  rows = block_rows(assignments, num_experts)
  blocks = num_blocks(assignments, num_experts)
  total_rows = blocks * rows
  order, expert, token = sort_assignments(top_experts)
  sizes = jnp.bincount(expert, length=num_experts)
  padded = -(-sizes // rows) * rows
  start = jnp.cumsum(sizes) - sizes  # first sorted assignment of each expert
  padded_end = jnp.cumsum(padded)
  dest = (padded_end - padded)[expert] + jnp.arange(assignments) - start[expert]  # [A] sorted
  # Block b belongs to the expert whose padded range contains row b * R; blocks past the last
  # group hold only zero rows and may use any expert.
  block_start = jnp.arange(blocks) * rows
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"),
                             num_experts - 1)
  return BlockPlan(
      source=jnp.full((total_rows,), num_tokens, jnp.int32).at[dest].set(token),
      row=jnp.zeros((assignments,), jnp.int32).at[order].set(dest).reshape(num_tokens, per_token),
      assignment=jnp.full((total_rows, 1), assignments, jnp.int32).at[dest, 0].set(order),
      block_expert=block_expert, rows_per_block=rows, num_rows=total_rows)


def num_blocks(assignments: int, num_experts: int) -> int:
  """Blocks enough for any routing: sum over groups of ceil(size / R) <= (A + G (R - 1)) / R
  for the G = min(E, A) groups that can be non-empty, and a sum of integers is at most the
  floor of its bound (rounding up could cost a whole block)."""
  rows = block_rows(assignments, num_experts)
  return (assignments + min(num_experts, assignments) * (rows - 1)) // rows


def block_rows(assignments: int, num_experts: int) -> int:
  target = max(assignments // (4 * num_experts), 1)
  rows = 1 << (target.bit_length() - 1)  # largest power of two <= target
  return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, rows))


def _rows(adapter: jax.Array | None, experts: jax.Array) -> jax.Array | None:
  return None if adapter is None else adapter[experts]


def sorted_experts(t, top_experts, top_weights, weights, adapters=None, *, activation: Callable,
                   matmul: Callable) -> jax.Array:
  """Assignments sorted by expert, padded into blocks of R rows, one batched matmul.

  t [M, D]; top_experts, top_weights [M, C]; weights (w1 [E, D, 2F], b1 [E, 2F], w2 [E, F, D],
  b2 [E, D]); activation [.., 2F] -> [.., F] -> the combined output [M, D] float32. adapters:
  None or LoRA factors (A1 [E, D, r], B1 [E, r, 2F], A2 [E, F, r], B2 [E, r, D]), scale in B.
  """
  w1, b1, w2, b2 = weights
  a1, u1, a2, u2 = adapters or (None,) * 4
  plan = block_plan(top_experts, w1.shape[0])
  x = take_rows(t, plan.source, plan.row)  # [blocks * R, D]
  x = x.reshape(-1, plan.rows_per_block, t.shape[1])  # [blocks, R, D]
  e = plan.block_expert
  # One copy of an expert's weights per block (not per token) feeds a batched matmul.
  h = matmul(x, w1[e]) + b1[e][:, None]  # [blocks, R, 2F]
  h = with_update(h, x, _rows(a1, e), _rows(u1, e), matmul)
  g = activation(h)  # [blocks, R, F]
  y = matmul(g, w2[e]) + b2[e][:, None]  # [blocks, R, D]
  y = with_update(y, g, _rows(a2, e), _rows(u2, e), matmul)
  y = take_rows(y.reshape(plan.num_rows, -1), plan.row.reshape(-1), plan.assignment)  # [M * C, D]
  return combine(y, top_weights)


def looped_experts(t, top_experts, top_weights, weights, adapters=None, *, activation: Callable,
                   matmul: Callable) -> jax.Array:
  """As sorted_experts, the blocks one after another in a loop: only the current block's expert
  weights are gathered (decoded, when `weights` holds `model.mxfp4.Mxfp4Experts`), where the
  batched matmul copies every block's at once (gigabytes at gpt-oss-20b widths)."""
  w1, b1, w2, b2 = weights
  a1, u1, a2, u2 = adapters or (None,) * 4
  plan = block_plan(top_experts, w1.shape[0])
  x = take_rows(t, plan.source, plan.row)  # [blocks * R, D]
  x = x.reshape(-1, plan.rows_per_block, t.shape[1])  # [blocks, R, D]

  # Recomputed in the backward pass: the loop then keeps only each block's rows, not its
  # decoded weights, for the gradient.
  @jax.checkpoint
  def one_block(x, e):
    h = matmul(x, w1[e]) + b1[e]  # [R, 2F]
    h = with_update(h, x, _rows(a1, e), _rows(u1, e), matmul)
    g = activation(h)  # [R, F]
    y = matmul(g, w2[e]) + b2[e]  # [R, D]
    return with_update(y, g, _rows(a2, e), _rows(u2, e), matmul)

  y = jax.lax.map(lambda block: one_block(*block), (x, plan.block_expert))  # [blocks, R, D]
  y = take_rows(y.reshape(plan.num_rows, -1), plan.row.reshape(-1), plan.assignment)  # [M * C, D]
  return combine(y, top_weights)


def ragged_experts(t, top_experts, top_weights, weights, adapters=None, *,
                   activation: Callable) -> jax.Array:
  """Assignments sorted by expert, grouped matmul with `jax.lax.ragged_dot`; as sorted_experts."""
  w1, b1, w2, b2 = weights
  a1, u1, a2, u2 = adapters or (None,) * 4
  order, expert, token = sort_assignments(top_experts)
  sizes = jnp.bincount(expert, length=w1.shape[0]).astype(jnp.int32)
  grouped = lambda x, w: jax.lax.ragged_dot(x, w, sizes)  # row group e times w[e]
  x = t[token]  # [A, D]
  h = with_update(grouped(x, w1) + b1[expert], x, a1, u1, grouped)  # [A, 2F]
  g = activation(h)  # [A, F]
  y = with_update(grouped(g, w2) + b2[expert], g, a2, u2, grouped)  # [A, D]
  return combine(jnp.zeros_like(y).at[order].set(y), top_weights)  # un-sorted, then combined
