"""Mixture-of-experts MLP: router, top-k, SwiGLU experts, and three ways to reach the experts.

`dense` runs every expert on every token (the test oracle, and `auto`'s choice for a decode
step when that moves fewer weights). `sorted` groups the token-expert assignments by expert into
fixed-size row blocks and runs one batched matmul over the blocks (`auto`'s choice for
batches). `ragged` groups the same way and uses `jax.lax.ragged_dot`. The last two cost
O(experts_per_token), not O(num_experts).

Measured, not assumed: on an H100 (JAX 0.11.2, the medium config in bfloat16) a `ragged` train
step took 2.35 s, 95% of it in two scatter fusions of ragged_dot's backward, and a `sorted` one
0.133 s. On this project's 2-core CPU `ragged_dot` runs ~4x slower than the batched einsum.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.config import GptOssConfig
from nanogptoss_jax.layers import RMSNorm, dtype_of, linear, matmul, normal_init, residual_init

SWIGLU_ALPHA = 1.702
# Rows per block in the `sorted` dispatch: about a quarter of the average group, within bounds.
# Bigger blocks copy expert weights fewer times; smaller ones waste fewer padded rows.
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 8, 512


def swiglu(h: jax.Array, limit: float) -> jax.Array:
  """The reference's clamped SwiGLU on interleaved channels [..., 2F] -> [..., F]."""
  gate, linear = h[..., ::2], h[..., 1::2]
  # Clamping keeps rare huge activations from blowing up (gate only from above, since
  # gate * sigmoid(gate) is already ~0 for very negative gates).
  gate = jnp.minimum(gate, limit)
  linear = jnp.clip(linear, -limit, limit)
  # `linear + 1`: the reference's extra bias of one on the linear branch.
  return gate * jax.nn.sigmoid(SWIGLU_ALPHA * gate) * (linear + 1)


# `sorted` moves each block's expert weights about three times (the gather reads and writes
# them, the matmul reads the copy); `dense` reads every expert's weights once, in place.
SORTED_WEIGHT_PASSES = 3


def resolve_moe_impl(name: str, tokens: int, num_experts: int, per_token: int) -> str:
  """`auto`: `dense` when it moves fewer weights and computes no more rows than `sorted`.

  `sorted` is the fastest on every backend measured (CPU, H100; see above) for many tokens.
  A decode step has a handful: its blocks of at least MIN_BLOCK_ROWS rows are mostly padding,
  and weight traffic decides. Batch-1 decoding on this CPU, dense vs sorted: bench-201k (4
  experts, top-2) 6.97 vs 7.43 ms/token, and with 4x wider experts 2.43 vs 3.18; top-1 of 4
  2.31 vs 2.18 and top-4 of 32 (gpt-oss-20b's routing) 15.4 vs 6.5, so those stay `sorted`.
  """
  if name != "auto":
    return name
  assignments = tokens * per_token
  blocks = _num_blocks(assignments, num_experts)
  fewer_weights = num_experts <= SORTED_WEIGHT_PASSES * blocks
  fewer_rows = tokens * num_experts <= blocks * _block_rows(assignments, num_experts)
  return "dense" if fewer_weights and fewer_rows else "sorted"


class MoE(nnx.Module):
  """GPT-OSS MLP block: RMSNorm, router with bias, top-k softmax, SwiGLU experts with biases."""

  def __init__(self, cfg: GptOssConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    experts, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    self.norm = RMSNorm(hidden, param_dtype=cfg.param_dtype, rngs=rngs)
    # The router runs in float32 whatever the compute dtype: top-k on bf16 logits ties often.
    self.gate = linear(hidden, experts, dtype=jnp.float32, param_dtype=param_dtype,
                       kernel_init=normal_init(), rngs=rngs)
    # Layouts are [E, in, out] (the reference stores [E, out, in]); mlp1's 2F output channels
    # interleave gate and linear units, as in the reference.
    self.mlp1_weight = nnx.Param(normal_init()(rngs.params(), (experts, hidden, 2 * inter), param_dtype))
    self.mlp1_bias = nnx.Param(jnp.zeros((experts, 2 * inter), param_dtype))
    self.mlp2_weight = nnx.Param(residual_init(cfg.num_hidden_layers)(
        rngs.params(), (experts, inter, hidden), param_dtype))
    self.mlp2_bias = nnx.Param(jnp.zeros((experts, hidden), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, groups: int = 1, impl: str | None = None
               ) -> tuple[jax.Array, dict]:
    """x [B, T, D] -> (MLP output [B, T, D], router statistics for the auxiliary losses).

    Tokens are dispatched to experts within `groups` equal slices of the batch. With the batch
    sharded over devices, one group per shard keeps the sort and the matmuls device-local.
    """
    batch, length, hidden = x.shape
    if batch % groups:
      raise ValueError(f"MoE groups={groups} must divide the batch size {batch}")
    t = self.norm(x).reshape(groups, batch * length // groups, hidden)  # [groups, N / groups, D]
    logits = self.gate(t.astype(jnp.float32))  # [groups, N / groups, E]
    top_logits, top_experts = jax.lax.top_k(logits, self.cfg.experts_per_token)  # [groups, N / groups, C]
    top_weights = jax.nn.softmax(top_logits, axis=-1)  # softmax over the chosen experts only
    impl = resolve_moe_impl(impl or self.cfg.moe_impl, t.shape[1], self.cfg.num_experts,
                            self.cfg.experts_per_token)
    expert_fn = {"dense": self._dense, "sorted": self._sorted, "ragged": self._ragged}[impl]
    weights = tuple(p[...].astype(self.dtype) for p in
                    (self.mlp1_weight, self.mlp1_bias, self.mlp2_weight, self.mlp2_bias))
    weight_axis = None
    if impl == "ragged":
      # ragged_dot's batching rule wants every operand batched along axis 0.
      weights = tuple(jnp.broadcast_to(w, (groups, *w.shape)) for w in weights)
      weight_axis = 0
    out = jax.vmap(expert_fn, in_axes=(0, 0, 0, weight_axis))(
        t.astype(self.dtype), top_experts, top_weights, weights)  # [groups, N / groups, D]
    num_experts, per_token = logits.shape[-1], top_experts.shape[-1]
    stats = router_stats(logits.reshape(-1, num_experts), top_experts.reshape(-1, per_token))
    return out.reshape(batch, length, hidden).astype(x.dtype), stats

  def _dense(self, t, top_experts, top_weights, weights):
    """Every expert on every token, combined with zero weight off the top-k."""
    w1, b1, w2, b2 = weights
    # Experts as a batch axis of both operands: each expert's [D, 2F] slice feeds a plain
    # matmul where it lies (contracting x with [E, D, 2F] directly transposes a weight copy).
    t = jnp.broadcast_to(t, (self.cfg.num_experts, *t.shape))  # [E, N, D]
    h = matmul(t, w1) + b1[:, None]  # [E, N, 2F]
    y = matmul(swiglu(h, self.cfg.swiglu_limit), w2) + b2[:, None]  # [E, N, D]
    rows = jnp.arange(t.shape[1])[:, None]
    combine = jnp.zeros((t.shape[1], self.cfg.num_experts), jnp.float32)
    combine = combine.at[rows, top_experts].set(top_weights)  # [N, E]
    return jnp.einsum("end,ne->nd", y.astype(jnp.float32), combine)

  def _sorted(self, t, top_experts, top_weights, weights):
    """Assignments sorted by expert, padded into blocks of R rows, one batched matmul."""
    w1, b1, w2, b2 = weights
    plan = block_plan(top_experts, self.cfg.num_experts)
    x = take_rows(t, plan.source, plan.row)  # [blocks * R, D]
    x = x.reshape(-1, plan.rows_per_block, t.shape[1])  # [blocks, R, D]
    e = plan.block_expert
    # One copy of an expert's weights per block (not per token) feeds a batched matmul.
    h = matmul(x, w1[e]) + b1[e][:, None]  # [blocks, R, 2F]
    y = matmul(swiglu(h, self.cfg.swiglu_limit), w2[e]) + b2[e][:, None]  # [blocks, R, D]
    y = take_rows(y.reshape(plan.num_rows, -1), plan.row.reshape(-1), plan.assignment)  # [N * C, D]
    return combine(y, top_weights)

  def _ragged(self, t, top_experts, top_weights, weights):
    """Assignments sorted by expert, grouped matmul with `jax.lax.ragged_dot`."""
    w1, b1, w2, b2 = weights
    order, expert, token = sort_assignments(top_experts)
    sizes = jnp.bincount(expert, length=self.cfg.num_experts).astype(jnp.int32)
    h = jax.lax.ragged_dot(t[token], w1, sizes) + b1[expert]  # [A, 2F]
    y = jax.lax.ragged_dot(swiglu(h, self.cfg.swiglu_limit), w2, sizes) + b2[expert]  # [A, D]
    return combine_sorted(y, order, top_weights)


def _rows_or_zeros(x: jax.Array, rows: jax.Array) -> jax.Array:
  """x[rows], with a zero row wherever an index is out of range."""
  return x.at[rows].get(mode="fill", fill_value=0)


@jax.custom_vjp
def take_rows(x: jax.Array, rows: jax.Array, readers: jax.Array) -> jax.Array:
  """x [M, D] -> x[rows] [len(rows), D], a zero row for an index of M (a padding row).

  readers [M, K] must list, for each row of x, every output row that reads it (padded with
  len(rows)). The backward pass then gathers each row's K gradients and sums them, where
  autodiff of a gather scatter-adds, and scatters run slowly on a CPU (nano's train step:
  554 -> 539 ms with the MoE dispatch and combine done this way).
  """
  return _rows_or_zeros(x, rows)


def _take_rows_forward(x, rows, readers):
  return _rows_or_zeros(x, rows), readers


def _take_rows_backward(readers, upstream):
  return _rows_or_zeros(upstream, readers).sum(axis=1), None, None


take_rows.defvjp(_take_rows_forward, _take_rows_backward)


def sort_assignments(top_experts: jax.Array):
  """Sorts the N * C token-expert assignments by expert: (order, expert, token) each [A]."""
  flat = top_experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  return order, flat[order], order // top_experts.shape[1]


def combine_sorted(y: jax.Array, order: jax.Array, top_weights: jax.Array) -> jax.Array:
  """Un-sorts expert outputs [A, D] and sums each token's C outputs with its router weights."""
  return combine(jnp.zeros_like(y).at[order].set(y), top_weights)


def combine(y: jax.Array, top_weights: jax.Array) -> jax.Array:
  """Expert outputs [N * C, D] in assignment order (token n's c-th at n * C + c) -> [N, D],
  each token's C outputs summed with its router weights [N, C]."""
  num_tokens, per_token = top_weights.shape
  y = y.reshape(num_tokens, per_token, -1).astype(jnp.float32)  # [N, C, D]
  return jnp.einsum("ncd,nc->nd", y, top_weights)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """Which buffer row holds each token-expert assignment, and which expert each block uses."""

  source: jax.Array  # [rows] token copied into each buffer row; N (a zero row) for padding
  row: jax.Array  # [N, C] buffer row of token n's c-th assignment
  assignment: jax.Array  # [rows, 1] flat assignment n * C + c in each row; N * C for padding
  block_expert: jax.Array  # [blocks]
  rows_per_block: int
  num_rows: int


def block_plan(top_experts: jax.Array, num_experts: int) -> BlockPlan:
  """Lays out assignments so that every block of R rows belongs to a single expert."""
  num_tokens, per_token = top_experts.shape
  assignments = top_experts.size
  rows = _block_rows(assignments, num_experts)
  num_blocks = _num_blocks(assignments, num_experts)
  num_rows = num_blocks * rows
  order, expert, token = sort_assignments(top_experts)
  sizes = jnp.bincount(expert, length=num_experts)
  padded = -(-sizes // rows) * rows
  start = jnp.cumsum(sizes) - sizes  # first sorted assignment of each expert
  padded_end = jnp.cumsum(padded)
  dest = (padded_end - padded)[expert] + jnp.arange(assignments) - start[expert]  # [A] sorted
  # Block b belongs to the expert whose padded range contains row b * R; blocks past the last
  # group hold only zero rows and may use any expert.
  block_start = jnp.arange(num_blocks) * rows
  block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"), num_experts - 1)
  return BlockPlan(
      source=jnp.full((num_rows,), num_tokens, jnp.int32).at[dest].set(token),
      row=jnp.zeros((assignments,), jnp.int32).at[order].set(dest).reshape(num_tokens, per_token),
      assignment=jnp.full((num_rows, 1), assignments, jnp.int32).at[dest, 0].set(order),
      block_expert=block_expert, rows_per_block=rows, num_rows=num_rows)


def _num_blocks(assignments: int, num_experts: int) -> int:
  """Blocks enough for any routing: sum over groups of ceil(size / R) <= (A + G (R - 1)) / R
  for the G = min(E, A) groups that can be non-empty, and a sum of integers is at most the
  floor of its bound (rounding up instead costs nano a whole block: 20 instead of 19)."""
  rows = _block_rows(assignments, num_experts)
  return (assignments + min(num_experts, assignments) * (rows - 1)) // rows


def _block_rows(assignments: int, num_experts: int) -> int:
  target = max(assignments // (4 * num_experts), 1)
  rows = 1 << (target.bit_length() - 1)  # largest power of two <= target
  return max(MIN_BLOCK_ROWS, min(MAX_BLOCK_ROWS, rows))


def router_stats(logits: jax.Array, top_experts: jax.Array) -> dict:
  """Per-layer load-balancing (Switch) and z-loss (ST-MoE) terms, and each expert's load."""
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)  # [N, E]
  load = jnp.bincount(top_experts.reshape(-1), length=num_experts) / top_experts.size  # [E]
  return {
      # E * sum_e (fraction of assignments to e) * (mean router probability of e); 1 when even.
      "load_balance_loss": num_experts * jnp.sum(jax.lax.stop_gradient(load) * probs.mean(0)),
      "router_z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
      "expert_load": load,
  }
