"""Large GPT-OSS: ~3.4B parameters (~1.6B active per token), full vocabulary; a multi-GPU run."""

from nanogptoss_jax import o200k
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.training.run_config import DataConfig, OptimConfig, RunConfig, TrainConfig


def get_config() -> RunConfig:
  """The large run; optimiser, batch and steps are first guesses."""
  model = GptOssConfig(
      num_hidden_layers=24,
      hidden_size=2048,
      head_dim=64,
      num_attention_heads=16,
      num_key_value_heads=8,
      num_experts=8,
      experts_per_token=2,
      intermediate_size=2048,
      sliding_window=128,
      rope_theta=150000.0,
      rope_scaling_factor=1.0,
      vocab_size=o200k.VOCAB_SIZE,
  )
  return RunConfig(
      model=model,
      data=DataConfig(compact_vocab_size=0),
      optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=200),
      # Float32 params and AdamW state alone take ~55 GB: accumulate micro-batches to bound
      # activations, and shard with execution.fsdp on more than one device.
      train=TrainConfig(steps=5000, batch_size=32, grad_accum=4, context_len=512, eval_every=250,
                        ckpt_every=500),
      run_dir="runs/large",
  )
