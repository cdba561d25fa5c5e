"""Compile time by depth: the train step's loss gradient, generate's prefill + decode, and a
server's warm-up (the engine's decode chunk and the prefill of every batch bucket).

Abstract parameters (nnx.eval_shape) for `train` and `inference`: nothing is allocated, only
lowered and compiled; `serve` builds the model (it times `Engine.warm_up`). Each (depth, layout)
is a new function, so every line is a cold compile in the same process.

  PYTHONPATH=. python benchmarks/compile_depth.py [--layers 4,12,24,36] [--impls loop,scan]
      [--what train,inference,serve]
"""

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.attention_memory import temp_bytes
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.sampling import decode
from nanogptoss_jax.sampling.filters import SamplerSettings
from nanogptoss_jax.training.config_files import load_config_file

PROMPT_BUCKET, CACHE_LENGTH, NEW_TOKENS = 16, 128, 64  # generate's shapes for a short prompt
SERVE_SLOTS, SERVE_PROMPT = 4, 100


def with_layout(execution: ExecutionConfig, impl: str) -> ExecutionConfig:
  """`execution` in layout `impl`; "default" leaves it (a code without layers_impl)."""
  return execution if impl == "default" else execution.replace(layers_impl=impl)


def train_seconds(cfg, execution, batch: int, length: int) -> tuple[float, int]:
  """(seconds to lower + compile, temp bytes) of the loss gradient for cfg."""
  start = time.perf_counter()
  temp = temp_bytes(cfg, execution, batch, length)
  return time.perf_counter() - start, temp


def inference_seconds(cfg, execution) -> float:
  """Seconds to lower + compile generate's prefill and decode loop (batch 1, greedy)."""
  model = nnx.eval_shape(lambda: GptOss(cfg, execution=execution, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model)
  start = time.perf_counter()
  tokens = jax.ShapeDtypeStruct((1, PROMPT_BUCKET), jnp.int32)
  cache = decode._prefill_jit.lower(graphdef, params, tokens, tokens,
                                    cache_length=CACHE_LENGTH).compile()
  cache = jax.eval_shape(lambda: model.init_cache(1, CACHE_LENGTH))
  row = jax.ShapeDtypeStruct((1,), jnp.int32)
  state = decode.DecodeState(
      cache=cache, token=row, position=row, done=jax.ShapeDtypeStruct((1,), bool),
      step=jax.ShapeDtypeStruct((), jnp.int32),
      output=jax.ShapeDtypeStruct((1, NEW_TOKENS), jnp.int32),
      key=jax.eval_shape(lambda: jax.random.key(0)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  stop = jax.ShapeDtypeStruct((decode.MIN_STOP_SLOTS,), jnp.int32)
  decode._decode_jit.lower(graphdef, params, state, NEW_TOKENS, scalar, scalar, stop,
                           settings=SamplerSettings(greedy=True, top_k=None,
                                                    use_top_p=False)).compile()
  return time.perf_counter() - start


def serve_seconds(cfg, execution) -> float:
  """Seconds of `Engine.warm_up` for a short prompt (what `serve.py` does before serving)."""
  from nanogptoss_jax.serving.engine import Engine
  engine = Engine(GptOss(cfg, execution=execution, rngs=nnx.Rngs(0)), slots=SERVE_SLOTS,
                  cache_length=256)
  try:
    start = time.perf_counter()
    engine.warm_up(SERVE_PROMPT)
    return time.perf_counter() - start
  finally:
    engine.close()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", default="4,12,24,36")
  parser.add_argument("--impls", default="loop,scan", help="layers_impl values; default: as is")
  parser.add_argument("--what", default="train,inference,serve")
  parser.add_argument("--config", default="configs/nano.py")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--remat", default="none", help="none, block or matmuls")
  args = parser.parse_args()
  run = load_config_file(args.config)
  base, execution = run.model, run.execution.replace(remat=args.remat)
  # The first compile in a process also pays for JAX's own warm-up: keep it out of the table.
  train_seconds(base.replace(num_hidden_layers=1), execution, args.batch, args.length)
  inference_seconds(base.replace(num_hidden_layers=1), execution)
  for what in args.what.split(","):
    for layers in map(int, args.layers.split(",")):
      for impl in args.impls.split(","):  # alternating, so load on the machine hits both alike
        cfg, layout = base.replace(num_hidden_layers=layers), with_layout(execution, impl)
        if what == "train":
          seconds, temp = train_seconds(cfg, layout, args.batch, args.length)
          extra = f"  temp {temp / 2**20:8.1f} MiB"
        else:
          seconds, extra = (inference_seconds if what == "inference" else serve_seconds)(
              cfg, layout), ""
        print(f"{what:9s} remat {args.remat:7s} layers {layers:3d} {impl:7s} "
              f"compile {seconds:6.1f} s{extra}", flush=True)


if __name__ == "__main__":
  main()
