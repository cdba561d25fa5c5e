"""Medium GPT-OSS at the seed's real training shape: 4,000-token contexts, batch 5.

Attention (flash from 1k tokens under `auto`) and the chunked loss keep the step's temporaries
near-linear in the context; its 12 layers are scanned (`auto`), and the backward pass recomputes
each block but its matmul outputs (remat "matmuls"): 7.1 GB of temporaries at this shape in
XLA's memory analysis against 28.5 GB without remat (docs/benchmarks.md).
"""

import dataclasses
from pathlib import Path

from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.training.run_config import RunConfig


def get_config() -> RunConfig:
  """configs/medium.py's model and optimizer (AdamW 3e-4 cosine to 3e-5), 5 x 4,000 tokens."""
  cfg = load_config_file(Path(__file__).with_name("medium.py"))
  train = dataclasses.replace(cfg.train, batch_size=5, grad_accum=1, context_len=4000)
  execution = cfg.execution.replace(remat="matmuls")
  return dataclasses.replace(cfg, execution=execution, train=train, run_dir="runs/medium_4k")
