"""The benchmark config: a narrow 4-layer GPT-OSS, its cost dominated by the 201088 vocabulary."""

from nanogptoss_jax import o200k
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.training.run_config import DataConfig, RunConfig, TrainConfig


def get_config() -> RunConfig:
  """The benchmark run (the model is fixed; step counts are for timing, not for quality)."""
  model = GptOssConfig(
      num_hidden_layers=4,
      hidden_size=256,
      intermediate_size=256,
      head_dim=64,
      num_attention_heads=4,
      num_key_value_heads=2,
      num_experts=4,
      experts_per_token=2,
      sliding_window=128,
      rope_theta=150000.0,
      rope_scaling_factor=1.0,
      vocab_size=o200k.VOCAB_SIZE,
  )
  return RunConfig(
      model=model,
      data=DataConfig(compact_vocab_size=0),
      # 4 micro-batches of 4 x 256 tokens: the [tokens, 201088] float32 logits stay at 0.8 GB.
      train=TrainConfig(steps=100, batch_size=16, grad_accum=4, context_len=256, eval_every=50,
                        ckpt_every=100),
      run_dir="runs/bench_201k",
  )
