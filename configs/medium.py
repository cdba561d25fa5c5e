"""Medium GPT-OSS: the seed project's training setup, full o200k_harmony vocabulary."""

from nanogptoss_jax import o200k
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.training.run_config import DataConfig, OptimConfig, RunConfig, TrainConfig

# The seed's model: 12 layers, width 1024, 4 experts with one per token, no YaRN.
SEED_MEDIUM = GptOssConfig(
    num_hidden_layers=12, num_experts=4, experts_per_token=1, hidden_size=1024,
    intermediate_size=1024, head_dim=64, num_attention_heads=8, num_key_value_heads=4,
    sliding_window=128, rope_theta=150000.0, rope_scaling_factor=1.0, initial_context_length=4096,
    vocab_size=o200k.VOCAB_SIZE)


def get_config() -> RunConfig:
  """The seed's run: 12 layers, width 1024, 4 experts (1 per token), AdamW 3e-4 cosine to 3e-5."""
  return RunConfig(
      model=SEED_MEDIUM,
      # bfloat16 compute (float32 params and optimiser state): this config is meant for a GPU.
      execution=ExecutionConfig(dtype="bfloat16"),
      data=DataConfig(compact_vocab_size=0),  # 0: the full vocabulary
      optim=OptimConfig(lr=3e-4, min_lr=3e-5, warmup_steps=100, weight_decay=0.1),
      train=TrainConfig(steps=5000, batch_size=32, grad_accum=2, context_len=512, eval_every=250,
                        ckpt_every=500),
      run_dir="runs/medium",
  )
