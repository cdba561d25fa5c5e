"""finetune_nano_chat.py with LoRA instead of full fine-tuning: rank 8 (alpha 16) on attention's
q, k, v, o and the experts' mlp1, mlp2, plus the embedding and unembedding; the same base, chats,
steps and batches.

  .venv/bin/python train.py --config configs/finetune_nano_chat_lora.py     # runs/nano_chat_lora
  .venv/bin/python chat.py --checkpoint runs/nano_chat_lora

Adapters alone (--config.train.trainable=lora_) do not learn harmony's headers: TinyStories never
shows `<|channel|>`, `analysis`, `final`, ... (nor most single bytes), so pre-training pushed all
their unembedding columns the same way (cosine 0.92-0.96 with one another in runs/nano) and no
hidden state an adapter can reach tells `analysis` from byte 0x06. 1 of 8 sampled answers had
well-formed analysis and final headers (held-out loss 2.322); with the (un)embedding training
too, see docs/finetune_nano/report.md. This is PEFT's `modules_to_save` for new tokens; it trains
every row of both tables, not only the harmony ones.
"""

import dataclasses
from pathlib import Path

from nanogptoss_jax.model.lora import LORA_PATTERN, LoraConfig
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.training.run_config import OptimConfig

# `embedding` matches both tables' paths: embedding.embedding and unembedding.kernel.
EMBEDDING_TABLES = "embedding"


def get_config():
  """The adapters (0.22M parameters) and the two 4,096 x 256 tables (2.1M) train; the other
  3.95M of nano's 6.05M stay frozen."""
  full = load_config_file(Path(__file__).with_name("finetune_nano_chat.py"))
  return dataclasses.replace(
      full, lora=LoraConfig(rank=8, alpha=16.0), run_dir="runs/nano_chat_lora",
      train=dataclasses.replace(full.train, trainable=f"{LORA_PATTERN}|{EMBEDDING_TABLES}"),
      # Ten times full fine-tuning's rate: an adapter starts at zero (B = 0) and its update is a
      # rank-8 product, so it needs a larger step to move as far; LoRA's best rate is commonly
      # ~10x full fine-tuning's (OpenAI's gpt-oss LoRA recipe uses 2e-4 on 20b).
      optim=OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=20))
