"""Small GPT-OSS: a single-GPU run on TinyStories."""

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.training.run_config import DataConfig, OptimConfig, RunConfig, TrainConfig

# A compact vocabulary rather than the full 201088: at width 512 the full (un)embedding alone
# would hold ~206M parameters, most of them for tokens TinyStories never uses.
VOCAB_SIZE = 16384


def get_config() -> RunConfig:
  """The small run; batch and steps are first guesses."""
  model = GptOssConfig(
      num_hidden_layers=6,
      hidden_size=512,
      head_dim=64,
      num_attention_heads=8,
      num_key_value_heads=4,
      num_experts=4,
      experts_per_token=2,
      intermediate_size=512,
      sliding_window=128,
      rope_theta=150000.0,
      rope_scaling_factor=1.0,
      vocab_size=VOCAB_SIZE,
  )
  return RunConfig(
      model=model,
      data=DataConfig(compact_vocab_size=VOCAB_SIZE),
      optim=OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=100),
      train=TrainConfig(steps=2000, batch_size=32, context_len=256, eval_every=200,
                        ckpt_every=500),
      run_dir="runs/small",
  )
