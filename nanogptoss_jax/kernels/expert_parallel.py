"""Expert parallelism: the experts of an MoE layer split over mesh axes, each device holding
E / X of them, and tokens (not weights) moving between devices (twin: the single-device
dispatch of `model.moe`, which gives the same outputs and gradients; tests/test_expert_parallel.py).

Two ways to reach the experts, by where the tokens are:
- `exchanged_experts` (training: tokens split over every device of the batch). Each device
  writes its token-expert assignments into fixed buffers, `capacity` slots per expert
  [E, capacity, D], and one `all_to_all` over the expert axis hands every device the slots of
  its own experts from all X devices [E/X, X * capacity, D]; the experts run as one batched
  matmul and a second `all_to_all` sends the outputs back. Dense and static-shaped, so it runs
  on every backend (XLA:CPU refuses `ragged_all_to_all`, jax#34755). With capacity = M (the
  tokens of one device) it is dropless by construction, since a token picks an expert at most
  once; a smaller capacity drops the assignments past it, counted and reported.
- `replicated_experts` (inference: every device holds the same few tokens). Each device runs its
  own experts on the assignments that chose them and a `psum` adds the partial outputs, so a
  decode step moves [M, D] activations and never a weight (as jax-llm-examples decodes).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from nanogptoss_jax.kernels import moe_dispatch
from nanogptoss_jax.kernels.moe_dispatch import combine


def capacity(tokens: int, per_token: int, num_experts: int, factor: float) -> int:
  """Slots per (device, expert): `factor` times the even share, at most `tokens`; 0 -> tokens."""
  if factor <= 0:
    return tokens
  return max(1, min(tokens, int(-(-factor * tokens * per_token // num_experts))))


def _slots(top_experts: jax.Array, num_experts: int, slots: int):
  """(buffer row of each assignment [M * C] (E * slots where dropped), dropped count): the
  assignments of each expert take its slots in token order."""
  flat = top_experts.reshape(-1)
  one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)  # [A, E]
  rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0), flat[:, None], axis=1)[:, 0] - 1
  kept = rank < slots
  return jnp.where(kept, flat * slots + rank, num_experts * slots), jnp.sum(~kept)


def _exchange(t, top_experts, top_weights, w1, b1, w2, b2, *, activation, matmul, axis, slots):
  """One device's part: t [1, M, D], routing [1, M, C], its experts' weights [E/X, ...]."""
  t, top_experts, top_weights = t[0], top_experts[0], top_weights[0]
  local, hidden = w1.shape[0], t.shape[1]
  devices = jax.lax.axis_size(axis)
  num_experts = local * devices
  row, dropped = _slots(top_experts, num_experts, slots)
  token = jnp.arange(row.shape[0]) // top_experts.shape[1]
  send = jnp.zeros((num_experts * slots, hidden), t.dtype).at[row].set(t[token], mode="drop")
  # Expert-major rows: device x's experts are rows [x * E/X * slots, (x + 1) * E/X * slots).
  received = jax.lax.all_to_all(send, axis, 0, 0, tiled=True)  # [X * E/X * slots, D]
  x = received.reshape(devices, local, slots, hidden).transpose(1, 0, 2, 3)
  x = x.reshape(local, devices * slots, hidden)  # [E/X, X * slots, D]: each local expert's rows
  h = matmul(x, w1) + b1[:, None]  # [E/X, X * slots, 2F]
  y = matmul(activation(h), w2) + b2[:, None]  # [E/X, X * slots, D]
  y = y.reshape(local, devices, slots, hidden).transpose(1, 0, 2, 3)  # [X, E/X, slots, D]
  back = jax.lax.all_to_all(y.reshape(-1, hidden), axis, 0, 0, tiled=True)  # [E * slots, D]
  y = back.at[row].get(mode="fill", fill_value=0)  # [M * C, D]; a dropped assignment adds 0
  return combine(y, top_weights)[None], dropped[None]


def _exclusive_cumsum(x: jax.Array, axis: int = -1) -> jax.Array:
  return jnp.cumsum(x, axis=axis) - x


def _exchange_ragged(t, top_experts, top_weights, w1, b1, w2, b2, *, activation, matmul, axis,
                     slots):
  """`_exchange` with `ragged_all_to_all` (GPU, TPU): each device sends each expert exactly its
  assignments, dropless; received rows land grouped by local expert, for `ragged_dot`."""
  del matmul, slots  # grouped matmuls; every assignment travels
  t, top_experts, top_weights = t[0], top_experts[0], top_weights[0]
  local, hidden = w1.shape[0], t.shape[1]
  devices, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  num_experts = local * devices
  order, expert, token = moe_dispatch.sort_assignments(top_experts)
  sent = t[token]  # [A, D] sorted by expert, so by destination device
  mine = jnp.bincount(expert, length=num_experts).astype(jnp.int32)  # [E]
  counts = jax.lax.all_gather(mine, axis)  # [X, E]: what each device sends each expert
  # Device j's buffer: its experts in order, each one's rows from devices 0..X-1 in order.
  base = _exclusive_cumsum(counts.sum(0).reshape(devices, local)).reshape(-1)  # [E]
  before = _exclusive_cumsum(counts, axis=0)  # [X, E]: rows of lower devices per expert
  sources = _exclusive_cumsum(counts)  # [X, E]: each expert's first row on each sender
  here = lambda m: jax.lax.dynamic_slice_in_dim(m, me * local, local, axis=-1)  # my experts
  received = jax.lax.ragged_all_to_all(
      sent, jnp.zeros((devices * sent.shape[0], hidden), t.dtype), sources[me], mine,
      base + before[me], here(counts).reshape(-1), axis_name=axis)  # [X * A, D]
  sizes = here(counts).sum(0)  # [E/X] rows per local expert
  row_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(received.shape[0]),
                                            side="right"), local - 1)
  h = jax.lax.ragged_dot(received, w1, sizes) + b1[row_expert]  # [X * A, 2F]
  y = jax.lax.ragged_dot(activation(h), w2, sizes) + b2[row_expert]  # [X * A, D]
  # Back the same way: slot (s, e) of my buffer returns to where sender s took it from.
  returned = jax.lax.ragged_all_to_all(
      y.astype(t.dtype), jnp.zeros_like(sent), (here(base)[None] + here(before)).reshape(-1),
      here(counts).reshape(-1), here(sources).reshape(-1), mine, axis_name=axis)  # [A, D]
  y = jnp.zeros_like(returned).at[order].set(returned)  # assignment order
  # No drops; a count of zero derived from the routing, so it varies over devices as _exchange's.
  return combine(y, top_weights)[None], jnp.sum(top_experts < 0)[None]


def exchanged_experts(t, top_experts, top_weights, weights, *, activation: Callable,
                      matmul: Callable, batch_axes: tuple[str, ...], expert_axis: str,
                      capacity_factor: float = 0.0, ragged: bool | None = None):
  """t [P, M, D] with P = the devices of `batch_axes` (one group each), routing [P, M, C],
  weights (w1 [E, D, 2F], b1 [E, 2F], w2 [E, F, D], b2 [E, D]) -> (out [P, M, D] float32,
  dropped assignments per group [P]).

  `ragged` None: fixed slots on the CPU, `ragged_all_to_all` (dropless, whatever the capacity)
  on the platforms that have it, chosen by the platform the program is lowered for."""
  slots = capacity(t.shape[1], top_experts.shape[2], weights[0].shape[0], capacity_factor)
  rows, experts = P(batch_axes), P(expert_axis)
  others = tuple(axis for axis in batch_axes if axis != expert_axis)

  def part(t, top_experts, top_weights, w1, b1, w2, b2):
    # Each device's weights as varying over the batch's other axes too, so that custom VJPs
    # (the matmul kernel) see operands and gradients of one type; their transpose sums them.
    w1, b1, w2, b2 = jax.lax.pcast((w1, b1, w2, b2), others, to="varying")
    options = dict(activation=activation, matmul=matmul, axis=expert_axis, slots=slots)
    dense = functools.partial(_exchange, **options)
    sparse = functools.partial(_exchange_ragged, **options)
    args = (t, top_experts, top_weights, w1, b1, w2, b2)
    if ragged is None:  # XLA:CPU has no ragged-all-to-all (jax#34755)
      return jax.lax.platform_dependent(*args, cpu=dense, default=sparse)
    return (sparse if ragged else dense)(*args)

  return jax.shard_map(part, in_specs=(rows, rows, rows) + (experts,) * 4,
                       out_specs=(rows, rows))(t, top_experts, top_weights, *weights)


def replicated_experts(t, top_experts, top_weights, weights, *, activation: Callable,
                       matmul: Callable, expert_axes: tuple[str, ...]):
  """t [1, M, D] and routing [1, M, C] on every device, the experts split over `expert_axes`:
  each device runs every token through its own experts, weighted by the router where the
  token chose them (0 elsewhere), and the partial outputs are summed -> [1, M, D] float32.

  Dense over the local experts: a decode step's few tokens cost E/X expert reads per device
  either way, and the shapes stay static."""
  experts = P(expert_axes)

  def part(t, top_experts, top_weights, w1, b1, w2, b2):
    # The tokens as varying over the expert axes like the weights (see exchanged_experts).
    t, top_experts, top_weights = jax.lax.pcast((t[0], top_experts[0], top_weights[0]),
                                                expert_axes, to="varying")
    local = w1.shape[0]
    index = jax.lax.axis_index(expert_axes)  # row-major over the axes, as P(expert_axes) splits
    # one_hot of another device's expert (out of [0, E/X)) is all zeros: it adds nothing.
    mine = jax.nn.one_hot(top_experts - index * local, local, dtype=jnp.float32)  # [M, C, E/X]
    gates = jnp.einsum("mce,mc->me", mine, top_weights)  # [M, E/X]
    x = jnp.broadcast_to(t, (local, *t.shape))  # [E/X, M, D]
    h = matmul(x, w1) + b1[:, None]  # [E/X, M, 2F]
    y = matmul(activation(h), w2) + b2[:, None]  # [E/X, M, D]
    out = jnp.einsum("emd,me->md", y.astype(jnp.float32), gates)
    return jax.lax.psum(out, expert_axes)[None]

  return jax.shard_map(part, in_specs=(P(), P(), P()) + (experts,) * 4,
                       out_specs=P())(t, top_experts, top_weights, *weights)
