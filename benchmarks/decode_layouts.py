"""Batch-1 greedy decode speed (generate: prefill, then the jitted decode loop), paired A/B.

One process per side, each compiling once and then timing one `generate` call per line it reads
on stdin; the driver alternates the sides (A then B, B then A, ...) so machine load hits both
alike. A side is a source tree (e.g. an export of main) and a `layers_impl` ("default": as the
code has it). Same seed, same tokens (checked).

  PYTHONPATH=. python benchmarks/decode_layouts.py --a .:loop --b /tmp/before:default \
      [--layers 24] [--width 512] [--tokens 64] [--pairs 10]
  nano's shapes: --config configs/nano.py
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def model(args):
  from flax import nnx

  from nanogptoss_jax.model.config import GptOssConfig
  from nanogptoss_jax.model.execution import ExecutionConfig
  from nanogptoss_jax.model.gptoss import GptOss
  if args.config:
    from nanogptoss_jax.training.config_files import load_config_file
    run = load_config_file(args.config)
    cfg, execution = run.model, run.execution
  else:
    cfg = GptOssConfig(num_hidden_layers=args.layers, hidden_size=args.width, head_dim=64,
                       num_attention_heads=8, num_key_value_heads=2, num_experts=8,
                       experts_per_token=2, intermediate_size=2 * args.width, vocab_size=4096,
                       sliding_window=128, rope_scaling_factor=1.0)
    execution = ExecutionConfig()
  if args.impl != "default":
    execution = execution.replace(layers_impl=args.impl)
  return GptOss(cfg, execution=execution, rngs=nnx.Rngs(0))


def side(args):
  """Compiles, then times one generate per stdin line; prints {"seconds", "tokens"} each."""
  from nanogptoss_jax.sampling.decode import generate
  m = model(args)
  prompt = [[1, 2, 3]]
  tokens = generate(m, prompt, args.tokens, temperature=0.0)  # compiles
  print(json.dumps({"ready": True, "tokens": tokens[0]}), flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    generate(m, prompt, args.tokens, temperature=0.0)
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def start(spec: str, args) -> subprocess.Popen:
  root, impl = spec.rsplit(":", 1)
  command = [sys.executable, os.path.abspath(__file__), "--side", "--impl", impl,
             "--tokens", str(args.tokens), "--layers", str(args.layers), "--width",
             str(args.width)] + (["--config", os.path.abspath(args.config)] if args.config else [])
  env = {**os.environ, "PYTHONPATH": os.path.abspath(root)}
  return subprocess.Popen(command, cwd=root, env=env, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)


def ask(process) -> dict:
  return json.loads(process.stdout.readline())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--a", default=".:default", help="ROOT:LAYERS_IMPL")
  parser.add_argument("--b", default=".:loop", help="ROOT:LAYERS_IMPL")
  parser.add_argument("--config", default=None)
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--width", type=int, default=512)
  parser.add_argument("--tokens", type=int, default=64)
  parser.add_argument("--pairs", type=int, default=10)
  parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--impl", default="default", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.side:
    return side(args)
  sides = {"a": start(args.a, args), "b": start(args.b, args)}
  ready = {name: ask(process) for name, process in sides.items()}
  assert ready["a"]["tokens"] == ready["b"]["tokens"], "the sides decoded different tokens"
  seconds = {"a": [], "b": []}
  for pair in range(args.pairs):
    for name in ("ab" if pair % 2 == 0 else "ba"):
      sides[name].stdin.write("go\n")
      sides[name].stdin.flush()
      seconds[name].append(ask(sides[name])["seconds"])
  for process in sides.values():
    process.stdin.close()
    process.wait()
  ratios = [b / a for a, b in zip(seconds["a"], seconds["b"])]
  for name, spec in (("a", args.a), ("b", args.b)):
    median = statistics.median(seconds[name])
    print(f"{name} {spec}: median {args.tokens / median:6.1f} tok/s ({median:.3f} s for "
          f"{args.tokens} tokens), best {args.tokens / min(seconds[name]):6.1f} tok/s")
  print(f"b / a time per pair: median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, "
        f"max {max(ratios):.3f}, a faster in {sum(r > 1 for r in ratios)}/{len(ratios)} pairs")


if __name__ == "__main__":
  main()
