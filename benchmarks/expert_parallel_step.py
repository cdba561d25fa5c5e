"""The expert-parallel MoE (kernels/expert_parallel.py) on however many local devices there are
(one is enough: the all_to_all is then the identity), against the single-device sorted
dispatch: equal outputs and gradients, and the time of a forward + backward of each.

    PYTHONPATH=. python benchmarks/expert_parallel_step.py [--tokens 8192] [--capacity 0]

Random tokens and weights at the medium config's MoE width (D = F = 1024), 8 experts, 2 each.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nanogptoss_jax.kernels import expert_parallel, moe_dispatch
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.moe import swiglu
from nanogptoss_jax.parallel import rules
from nanogptoss_jax.parallel.mesh import make_mesh


def timed(fn, *args, rounds: int = 5) -> float:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(rounds):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / rounds


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--per-token", type=int, default=2)
  parser.add_argument("--capacity", type=float, default=0.0)
  parser.add_argument("--dtype", default="bfloat16")
  args = parser.parse_args()
  devices = jax.local_device_count()
  mesh = make_mesh(ExecutionConfig(expert=devices))
  dtype, d, e = jnp.dtype(args.dtype), args.hidden, args.experts
  keys = jax.random.split(jax.random.key(0), 6)
  t = jax.random.normal(keys[0], (devices, args.tokens // devices, d), dtype)
  logits = jax.random.normal(keys[1], (devices, args.tokens // devices, e))
  top_weights, top_experts = jax.lax.top_k(logits, args.per_token)
  top_weights = jax.nn.softmax(top_weights, -1)
  weights = tuple(0.02 * jax.random.normal(k, s, dtype) for k, s in zip(
      keys[2:], ((e, d, 2 * d), (e, 2 * d), (e, d, d), (e, d))))
  rows, split = NamedSharding(mesh, P(rules.BATCH_AXES)), NamedSharding(mesh, P(rules.EXPERT))
  t, top_experts, top_weights = jax.device_put((t, top_experts, top_weights), rows)
  weights = jax.device_put(weights, split)
  options = dict(activation=functools.partial(swiglu, limit=7.0), matmul=jnp.matmul)

  def parallel(t, weights):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      out, dropped = expert_parallel.exchanged_experts(
          t, top_experts, top_weights, weights, batch_axes=rules.BATCH_AXES,
          expert_axis=rules.EXPERT, capacity_factor=args.capacity, **options)
    return out.sum(), dropped.sum()

  def single(t, weights):
    out = jax.vmap(functools.partial(moe_dispatch.sorted_experts, **options),
                   in_axes=(0, 0, 0, None))(t, top_experts, top_weights, weights)
    return out.sum(), jnp.int32(0)

  results = {}
  for name, fn in (("expert_parallel", parallel), ("sorted", single)):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))
    (value, dropped), grads = step(t, weights)
    results[name] = (float(value), int(dropped), grads, timed(step, t, weights))
  ours, theirs = results["expert_parallel"], results["sorted"]
  errors = [float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)))
                  / max(float(np.max(np.abs(np.asarray(b, np.float32)))), 1e-30))
            for a, b in zip(jax.tree.leaves(ours[2]), jax.tree.leaves(theirs[2]))]
  print(f"devices {devices} ({jax.devices()[0].device_kind}), {args.tokens} tokens, D=F={d}, "
        f"E={e}, C={args.per_token}, {args.dtype}, capacity {args.capacity}")
  print(f"dropped assignments: {ours[1]}; max relative gradient difference: {max(errors):.2e}")
  for name, (_, _, _, seconds) in results.items():
    print(f"{name:16s} forward + backward {seconds * 1e3:8.2f} ms")


if __name__ == "__main__":
  main()
