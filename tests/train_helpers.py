"""A tiny run config on the local TinyStories sample, shared by the training tests."""

import dataclasses
from pathlib import Path

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.training.run_config import DataConfig, OptimConfig, RunConfig, TrainConfig

HF_MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "hf"
TINY_VOCAB = 512


def tiny_run(run_dir, cache_dir, **train_changes) -> RunConfig:
  """A 2-layer GPT-OSS on the first stories of the local sample: steps take milliseconds."""
  model = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2,
                       vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=32, head_dim=8,
                       num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                       rope_scaling_factor=1.0)
  train = TrainConfig(steps=12, batch_size=8, context_len=32, log_every=1, eval_every=6,
                      ckpt_every=4, keep_checkpoints=5, sample_tokens=8)
  return RunConfig(
      model=model,
      data=DataConfig(path=str(HF_MIRROR), cache_dir=str(cache_dir), compact_vocab_size=TINY_VOCAB,
                      max_stories=300, val_windows=16),
      optim=OptimConfig(lr=3e-3, min_lr=3e-4, warmup_steps=2),
      train=dataclasses.replace(train, **train_changes),
      run_dir=str(run_dir))


def write_sum_chats(directory, train: int = 96, validation: int = 16) -> str:
  """train.jsonl and validation.jsonl of short harmony-ready chats (a sum asked, reasoned,
  answered; one in three with a system message); returns the directory."""
  import json
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for split, count, offset in (("train", train, 0), ("validation", validation, 1000)):
    rows = []
    for i in range(offset, offset + count):
      a, b = i % 17, (7 * i) % 13
      messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "thinking": f"Add {a} and {b}.", "content": f"{a + b}."}]
      if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
      rows.append(json.dumps({"messages": messages}) + "\n")
    (directory / f"{split}.jsonl").write_text("".join(rows))
  return str(directory)


def tiny_chat_run(run_dir, cache_dir, chats: str, **train_changes) -> RunConfig:
  """tiny_run fine-tuning on chat data (a compact vocabulary built from the chats unless
  init_from gives one): contexts of 128 tokens hold the whole conversation."""
  from nanogptoss_jax.data.config import ChatDataConfig
  changes = dict(context_len=128, batch_size=4, steps=8, ckpt_every=3, eval_every=4,
                 sample_tokens=6) | train_changes
  cfg = tiny_run(run_dir, cache_dir, **changes)
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat=ChatDataConfig(
      path=chats, val_conversations=12)))
