"""A gpt-oss-20b-shaped model with few layers (real widths, the 201k vocabulary, random MXFP4
experts): batch-1 greedy decode tokens/s with the experts kept in MXFP4 vs dequantized to floats
(float32 on the CPU, bfloat16 elsewhere), through the same `generate` the commands use.

usage: PYTHONPATH=. python benchmarks/pretrained_decode.py [--layers 2] [--new-tokens 32]
"""

import argparse
import gc
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.mxfp4_moe import random_mxfp4
from nanogptoss_jax.model import mxfp4
from nanogptoss_jax.model.config import GPT_OSS_20B
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.sampling.decode import generate


def build(cfg, execution, experts):
  model = GptOss(cfg, execution=execution, rngs=nnx.Rngs(0))
  for block, ((b1, s1), (b2, s2)) in zip(model.blocks, experts):
    moe = block.mlp
    if execution.expert_format == "mxfp4":
      moe.mlp1_blocks.set_value(b1), moe.mlp1_scales.set_value(s1)
      moe.mlp2_blocks.set_value(b2), moe.mlp2_scales.set_value(s2)
    else:  # stored [E, out, in]; our float layout is [E, in, out]
      moe.mlp1_weight.set_value(mxfp4.decode(b1, s1, execution.dtype).swapaxes(-1, -2))
      moe.mlp2_weight.set_value(mxfp4.decode(b2, s2, execution.dtype).swapaxes(-1, -2))
  return model


def weight_bytes(model) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main():
  parse = argparse.ArgumentParser(description=__doc__)
  parse.add_argument("--layers", type=int, default=2)
  parse.add_argument("--prompt-tokens", type=int, default=16)
  parse.add_argument("--new-tokens", type=int, default=32)
  args = parse.parse_args()
  dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
  base = GPT_OSS_20B.replace(num_hidden_layers=args.layers)
  # The loop layout: blocks are set one by one below.
  execution = ExecutionConfig(dtype=dtype, param_dtype=dtype, layers_impl="loop")
  d, f, e = base.hidden_size, base.intermediate_size, base.num_experts
  rng = np.random.default_rng(0)
  experts = [(random_mxfp4(rng, e, 2 * f, d), random_mxfp4(rng, e, d, f))
             for _ in range(args.layers)]
  prompt = [rng.integers(0, 199_998, args.prompt_tokens).tolist()]
  print(f"{jax.devices()[0].device_kind}: gpt-oss-20b widths, {args.layers} layers, batch 1, "
        f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, greedy")
  outputs = {}
  for mode, expert_format in (("keep", "mxfp4"), ("dequantize", "float")):
    model = build(base, execution.replace(expert_format=expert_format), experts)
    generate(model, prompt, args.new_tokens, temperature=0.0)  # compiles
    start = time.perf_counter()
    outputs[mode] = generate(model, prompt, args.new_tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    print(f"{mode:>10}: {args.new_tokens / seconds:7.2f} tok/s (prefill included), "
          f"weights {weight_bytes(model) / 1e9:.2f} GB")
    del model
    gc.collect()
  same = outputs["keep"] == outputs["dequantize"]
  print(f"same greedy tokens in both modes: {same}")


if __name__ == "__main__":
  main()
