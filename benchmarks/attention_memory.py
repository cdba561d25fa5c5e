"""Temporary memory of a train step's loss gradient by context length (XLA's analysis, CPU).

Abstract parameters (nnx.eval_shape): nothing is allocated, only compiled. Prints one line per
(attention_impl, T): temp MiB and the growth per doubling.

  python benchmarks/attention_memory.py [--impls auto,blocked] [--lengths 1024,2048,4096,8192]
  python benchmarks/attention_memory.py --config configs/medium_4k.py --layers 0 --batch 5 \
      --lengths 4000 --impls auto --loss-impls auto,fused
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model.gptoss import layer_layout
from nanogptoss_jax.model.registry import abstract_model
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.training.losses import token_losses


def temp_bytes(cfg, execution, batch: int, length: int) -> int:
  model = abstract_model(cfg, execution)
  graphdef, state = nnx.split(model)

  def loss(state, tokens):
    return token_losses(nnx.merge(graphdef, state), tokens)[0].mean()

  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--impls", default="auto,blocked")
  parser.add_argument("--lengths", default="1024,2048,4096,8192")
  parser.add_argument("--config", default="configs/nano.py")
  parser.add_argument("--layers", type=int, default=2, help="0: the config's own depth")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--loss-impls", default="auto")
  parser.add_argument("--remat", default="none", help="none, block or matmuls")
  parser.add_argument("--layers-impl", default="auto", help="auto, loop or scan")
  args = parser.parse_args()
  run = load_config_file(args.config)
  base, execution = run.model, run.execution.replace(remat=args.remat,
                                                     layers_impl=args.layers_impl)
  if args.layers:
    base = base.replace(num_hidden_layers=args.layers)
  for impl in args.impls.split(","):
    for loss_impl in args.loss_impls.split(","):
      previous = None
      for length in map(int, args.lengths.split(",")):
        start = time.perf_counter()
        options = execution.replace(attention_impl=impl, loss_impl=loss_impl)
        size = temp_bytes(base, options, args.batch, length)
        growth = f"x{size / previous:.2f}" if previous else ""
        print(f"layers {layer_layout(base, options)} remat {args.remat} attention {impl:8s} loss {loss_impl:8s} B={args.batch} T={length:6d} temp "
              f"{size / 2**20:10.1f} MiB {growth:6s} compile {time.perf_counter() - start:5.1f} s",
              flush=True)
        previous = size


if __name__ == "__main__":
  main()
