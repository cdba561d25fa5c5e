"""Paired in-process A/B: attention forward + backward, blocked vs flash (vs plain), CPU or GPU.

  python benchmarks/bench_attention.py [--lengths 256,1024] [--batch 16] [--impls blocked,flash]
  python benchmarks/bench_attention.py --impls plain,blocked,flash,dpa,dpa_cudnn --dtype bfloat16

Nano's attention shape (2 kv heads x 2 queries, head dim 64), sliding (128) and full layers;
the implementations alternate round by round so drift hits both alike. Prints median ms.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from nanogptoss_jax.model.attention import attend


def _dot_product_attention(q, k, v, window, implementation):
  """jax.nn.dot_product_attention (no sinks: its speed is the bar, not its values)."""
  batch, length, kv_heads, groups, head_dim = q.shape
  options = {} if window is None else {"local_window_size": (window - 1, 0)}
  out = jax.nn.dot_product_attention(
      q.reshape(batch, length, kv_heads * groups, head_dim), k.transpose(0, 2, 1, 3),
      v.transpose(0, 2, 1, 3), is_causal=True, implementation=implementation, **options)
  return out.reshape(q.shape)


def step_fn(impl, window, positions):
  def loss(q, k, v, sinks):
    if impl.startswith("dpa"):  # dpa: XLA's choice; dpa_cudnn: cuDNN (GPU, bf16 / f16 only)
      out = _dot_product_attention(q, k, v, window, "cudnn" if impl == "dpa_cudnn" else None)
      return jnp.sum(out.astype(jnp.float32))
    out = attend(q, k, v, positions, positions, window=window, sinks=sinks, impl=impl,
                 in_order=True)
    return jnp.sum(out.astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--lengths", default="256,1024")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--impls", default="blocked,flash")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  for length in map(int, args.lengths.split(",")):
    batch = max(1, args.batch * 256 // length)  # same tokens per step at every length
    for window in (128, None):
      shape = (batch, length, 2, 2, 64)
      q = jnp.asarray(rng.normal(size=shape), args.dtype)
      k, v = (jnp.asarray(rng.normal(size=(batch, 2, length, 64)), args.dtype) for _ in "kv")
      sinks = jnp.zeros((2, 2), jnp.float32)
      positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
      fns = {impl: step_fn(impl, window, positions) for impl in args.impls.split(",")}
      times = {impl: [] for impl in fns}
      for impl, fn in list(fns.items()):
        try:
          jax.block_until_ready(fn(q, k, v, sinks))
        except Exception as error:  # e.g. cuDNN absent or refusing the shape: say so, go on
          print(f"T={length} window={window} {impl}: {type(error).__name__}: "
                f"{str(error).splitlines()[0][:200]}", flush=True)
          del fns[impl], times[impl]
      for _ in range(args.rounds):
        for impl, fn in fns.items():
          start = time.perf_counter()
          jax.block_until_ready(fn(q, k, v, sinks))
          times[impl].append(time.perf_counter() - start)
      cells = "  ".join(f"{impl} {np.median(t) * 1e3:8.2f} ms" for impl, t in times.items())
      print(f"B={batch:3d} T={length:5d} window={window}: {cells}", flush=True)


if __name__ == "__main__":
  main()
