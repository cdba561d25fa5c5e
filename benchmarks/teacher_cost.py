"""What gpt-oss-20b costs as a distillation teacher, per token of training data, from its shapes
(an abstract model: nothing is allocated): weight bytes one forward call reads (MXFP4 experts,
bf16 elsewhere), forward FLOPs per token, and the disk an offline cache takes.

usage: PYTHONPATH=. python benchmarks/teacher_cost.py [--context 256] [--batch 16] [--k 32]
"""

import argparse
import math

from flax import nnx

from nanogptoss_jax.model.config import GPT_OSS_20B
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import EXPERT_PARAMS, abstract_loop_model

MXFP4_BYTES_PER_WEIGHT = 4.25 / 8  # a 4-bit value, plus one 8-bit scale per block of 32
BF16_BYTES = 2
TOP_K_BYTES_PER_SLOT = 4 + 4  # int32 id + float32 log-prob (data/teacher_rows.py)
SAMPLED_BYTES_PER_SLOT = 4 + 4 + 4  # + the proposal's log-prob


def counts(cfg) -> dict[str, int]:
  """Scalars of the float model: embedding, unembedding, expert weights, everything else."""
  model = abstract_loop_model(cfg, ExecutionConfig(expert_format="float"))
  out = {"embedding": 0, "unembedding": 0, "experts": 0, "other": 0}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    size = math.prod(variable.shape)
    names = [str(p) for p in path]
    key = ("experts" if names[-1] in EXPERT_PARAMS else "embedding" if names[0] == "embedding"
           else "unembedding" if names[0] == "unembedding" else "other")
    out[key] += size
  return out


def attention_flops(cfg, context: int) -> float:
  """Per token, averaged over positions 0..context-1: QK^T and PV over the keys each query sees."""
  total = 0.0
  for layer in range(cfg.num_hidden_layers):
    window = cfg.layer_window(layer) or context
    keys = sum(min(t + 1, window) for t in range(context)) / context
    total += 2 * 2 * keys * cfg.num_attention_heads * cfg.head_dim
  return total


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--context", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--k", type=int, default=32)
  args = parser.parse_args()
  cfg = GPT_OSS_20B
  n = counts(cfg)
  active_experts = n["experts"] * cfg.experts_per_token // cfg.num_experts
  # Matmul weights a token passes through (the embedding is a lookup: one row).
  matmul_active = n["other"] + active_experts + n["unembedding"]
  flops = 2 * matmul_active + attention_flops(cfg, args.context)
  weight_bytes = (n["experts"] * MXFP4_BYTES_PER_WEIGHT
                  + (n["other"] + n["embedding"] + n["unembedding"]) * BF16_BYTES)
  tokens = args.batch * args.context
  print(f"gpt-oss-20b: {sum(n.values()) / 1e9:.2f}B parameters, {n['experts'] / 1e9:.2f}B in "
        f"experts ({cfg.experts_per_token} of {cfg.num_experts} active)")
  print(f"forward FLOPs per token (context {args.context}): {flops / 1e9:.2f} GFLOP "
        f"({2 * matmul_active / 1e9:.2f} matmuls, "
        f"{attention_flops(cfg, args.context) / 1e9:.3f} attention)")
  print(f"weights read per forward call: {weight_bytes / 2**30:.2f} GiB (MXFP4 experts, bf16 "
        f"rest); per token at {tokens} tokens a call: {weight_bytes / tokens / 2**20:.2f} MiB")
  print(f"offline cache per million tokens, k={args.k}: top-k "
        f"{TOP_K_BYTES_PER_SLOT * args.k:,} MB, sampled {SAMPLED_BYTES_PER_SLOT * args.k:,} MB")


if __name__ == "__main__":
  main()
