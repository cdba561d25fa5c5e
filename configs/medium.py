"""Medium GPT-OSS: the seed project's training setup, full o200k_harmony vocabulary."""

from nanogptoss_jax import o200k
from nanogptoss_jax.model.config import SEED_MEDIUM
from nanogptoss_jax.training.run_config import DataConfig, OptimConfig, RunConfig, TrainConfig


def get_config() -> RunConfig:
  """The seed's run: 12 layers, width 1024, 4 experts (1 per token), AdamW 3e-4 cosine to 3e-5."""
  return RunConfig(
      # bfloat16 compute (float32 params and optimiser state): this config is meant for a GPU.
      model=SEED_MEDIUM.replace(vocab_size=o200k.VOCAB_SIZE, dtype="bfloat16"),
      data=DataConfig(compact_vocab_size=0),  # 0: the full vocabulary
      optim=OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=100, weight_decay=0.1),
      train=TrainConfig(steps=5000, batch_size=32, grad_accum=2, context_len=512, eval_every=250,
                        ckpt_every=500),
      run_dir="runs/medium",
  )
