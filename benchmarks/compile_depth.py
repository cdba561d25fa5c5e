"""Compile time of the train step's loss gradient by depth, layers in a loop vs scanned.

Abstract parameters (nnx.eval_shape): nothing is allocated, only lowered and compiled. Each
(depth, layout) is a new function, so every line is a cold compile in the same process.

  PYTHONPATH=. python benchmarks/compile_depth.py [--layers 4,12,24,36] [--impls loop,scan]
"""

import argparse
import time

from benchmarks.attention_memory import temp_bytes
from nanogptoss_jax.training.config_files import load_config_file


def compile_seconds(cfg, execution, batch: int, length: int) -> tuple[float, int]:
  """(seconds to lower + compile, temp bytes) of the loss gradient for cfg."""
  start = time.perf_counter()
  temp = temp_bytes(cfg, execution, batch, length)
  return time.perf_counter() - start, temp


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="4,12,24,36")
  parser.add_argument("--impls", default="loop,scan")
  parser.add_argument("--config", default="configs/nano.py")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--remat", default="none", help="none, block or matmuls")
  args = parser.parse_args()
  run = load_config_file(args.config)
  base, execution = run.model, run.execution.replace(remat=args.remat)
  # The first compile in a process also pays for JAX's own warm-up: keep it out of the table.
  compile_seconds(base.replace(num_hidden_layers=1), execution.replace(layers_impl="loop"),
                  args.batch, args.length)
  for layers in map(int, args.layers.split(",")):
    for impl in args.impls.split(","):  # alternating, so load on the machine hits both alike
      seconds, temp = compile_seconds(base.replace(num_hidden_layers=layers),
                                      execution.replace(layers_impl=impl), args.batch,
                                      args.length)
      print(f"remat {args.remat:7s} layers {layers:3d} {impl:5s} compile {seconds:6.1f} s  "
            f"temp {temp / 2**20:8.1f} MiB", flush=True)


if __name__ == "__main__":
  main()
