"""One gpt-oss-20b MoE layer at its real widths (D 2880, 32 experts of F 2880, top-4), random
MXFP4 weights, decode batches of 1 and 8: time per call and expert bytes read, `keep` (MXFP4
decoded per selected expert) vs float experts (float32 on the CPU, bfloat16 elsewhere).

usage: PYTHONPATH=. python benchmarks/mxfp4_moe.py [--repeats 20] [--batches 1 8]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.model import mxfp4
from nanogptoss_jax.model.config import GPT_OSS_20B
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.moe import MoE


def build(cfg, execution, blocks_and_scales, float_dtype):
  moe = MoE(cfg, execution=execution, rngs=nnx.Rngs(0))
  (b1, s1), (b2, s2) = blocks_and_scales
  if execution.expert_format == "mxfp4":
    moe.mlp1_blocks.set_value(b1), moe.mlp1_scales.set_value(s1)
    moe.mlp2_blocks.set_value(b2), moe.mlp2_scales.set_value(s2)
  else:
    moe.mlp1_weight.set_value(jnp.swapaxes(mxfp4.decode(b1, s1, float_dtype), -1, -2))
    moe.mlp2_weight.set_value(jnp.swapaxes(mxfp4.decode(b2, s2, float_dtype), -1, -2))
  return moe


def random_mxfp4(rng, experts, out, inputs):
  blocks = rng.integers(0, 256, (experts, out, inputs // 32, 16), dtype=np.uint8)
  scales = rng.integers(112, 124, (experts, out, inputs // 32), dtype=np.uint8)
  return jnp.asarray(blocks), jnp.asarray(scales)


def time_call(fn, x, repeats):
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parse = argparse.ArgumentParser(description=__doc__)
  parse.add_argument("--repeats", type=int, default=20)
  parse.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  args = parse.parse_args()
  on_cpu = jax.default_backend() == "cpu"
  float_dtype = "float32" if on_cpu else "bfloat16"
  base = GPT_OSS_20B.replace(num_hidden_layers=1)
  execution = ExecutionConfig(dtype=float_dtype, param_dtype=float_dtype)
  d, f, e, c = base.hidden_size, base.intermediate_size, base.num_experts, base.experts_per_token
  rng = np.random.default_rng(0)
  weights = (random_mxfp4(rng, e, 2 * f, d), random_mxfp4(rng, e, d, f))
  per_expert_mxfp4 = sum(b[0].nbytes + s[0].nbytes for b, s in weights)
  per_expert_float = 3 * d * f * jnp.dtype(float_dtype).itemsize
  print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), float experts in "
        f"{float_dtype}; per expert: MXFP4 {per_expert_mxfp4 / 1e6:.1f} MB, float "
        f"{per_expert_float / 1e6:.1f} MB")
  variants = [("keep (sorted, selected experts)", dict(expert_format="mxfp4", moe_impl="sorted")),
              ("keep, plain decode", dict(expert_format="mxfp4", moe_impl="sorted",
                                          mxfp4_impl="plain")),
              (f"{float_dtype} sorted", dict(moe_impl="sorted")),
              (f"{float_dtype} dense (auto)", dict(moe_impl="auto"))]
  for batch in args.batches:
    x = jnp.asarray(rng.normal(size=(batch, 1, d)), float_dtype)
    # Experts a decode step touches: distinct picks, at most batch * C.
    touched = min(e, batch * c)
    for name, changes in variants:
      moe = build(base, execution.replace(**changes), weights, float_dtype)
      graphdef, state = nnx.split(moe)
      # Weights as arguments, not captured constants (which XLA would fold at compile time).
      fn = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x)[0])
      seconds = time_call(lambda x, fn=fn, state=state: fn(state, x), x, args.repeats)
      dense = "dense" in name
      per_expert = per_expert_mxfp4 if name.startswith("keep") else per_expert_float
      read = (e if dense else touched) * per_expert
      print(f"batch {batch}: {name:34s} {seconds * 1e3:8.2f} ms/call, expert bytes read "
            f"<= {read / 1e9:.3f} GB ({read / seconds / 1e9:.1f} GB/s)")


if __name__ == "__main__":
  main()
