"""Batch-1 greedy decode speed with the blocks in a loop vs scanned (model/layer_stack.py).

A cached forward runs layer by layer in both layouts; in the scan layout each layer's weights
are slices of the stacks, which XLA copies per call. Same seed, same tokens (checked), rounds
alternating in one process.

  python benchmarks/decode_layouts.py [--layers 8] [--width 512] [--tokens 64] [--rounds 3]
"""

import argparse
import time

from flax import nnx

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.sampling.decode import generate


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  base = GptOssConfig(num_hidden_layers=args.layers, hidden_size=args.width, head_dim=64,
                      num_attention_heads=8, num_key_value_heads=2, num_experts=8,
                      experts_per_token=2, intermediate_size=2 * args.width, vocab_size=4096,
                      sliding_window=128, rope_scaling_factor=1.0)
  models = {impl: GptOss(base, execution=ExecutionConfig(layers_impl=impl), rngs=nnx.Rngs(0))
            for impl in ("loop", "scan")}
  prompt = [[1, 2, 3]]
  outputs = {impl: generate(m, prompt, args.tokens, temperature=0.0)  # compiles
             for impl, m in models.items()}
  assert outputs["loop"] == outputs["scan"], "the layouts decoded different tokens"
  best = dict.fromkeys(models, float("inf"))
  for _ in range(args.rounds):
    for impl, model in models.items():
      start = time.perf_counter()
      generate(model, prompt, args.tokens, temperature=0.0)
      best[impl] = min(best[impl], time.perf_counter() - start)
  for impl, seconds in best.items():
    print(f"{impl}: {args.tokens / seconds:6.1f} tok/s ({seconds:.3f} s for {args.tokens} tokens,"
          f" best of {args.rounds})")
  print(f"scan / loop time: {best['scan'] / best['loop']:.2f}x")


if __name__ == "__main__":
  main()
