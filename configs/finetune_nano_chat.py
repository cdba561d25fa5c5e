"""Fine-tunes the nano TinyStories run into a chat model: harmony conversations built from the
TinyStories sample (scripts/build_story_chats.py: a user asks for a story, the assistant plans it
in `analysis` and tells it in `final`), about ten minutes on a 2-core CPU.

  .venv/bin/python train.py --config configs/nano.py          # the base: runs/nano
  .venv/bin/python scripts/build_story_chats.py --tinystories ../shared/data/tinystories \\
      --out data/tinystories_chat
  .venv/bin/python train.py --config configs/finetune_nano_chat.py
  .venv/bin/python chat.py --checkpoint runs/nano_chat       # answers in harmony
  .venv/bin/python train.py --config configs/finetune_nano_chat_lora.py    # LoRA instead

nano's compact vocabulary holds harmony's special tokens and the words of its headers
(`assistant`, `final`, ...; build_compact_tokenizer keeps them whatever the counts), so no rows
are added and `<|start|>assistant<|channel|>final<|message|>` is 5 ids. TinyStories never shows
them, so their rows are untrained in the base: full fine-tuning trains them with the rest.
docs/finetune_nano/report.md has the held-out losses, a chat and a server exchange.
"""

import dataclasses
from pathlib import Path

from nanogptoss_jax.data.config import ChatDataConfig
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.training.run_config import OptimConfig, RunConfig

BASE_RUN = "runs/nano"
CHATS = "data/tinystories_chat"


def get_config() -> RunConfig:
  """nano's model and vocabulary from runs/nano; 512-token conversations (the median story chat
  is ~457 tokens in nano's vocabulary, so nano's 256 would drop most), longer ones dropped."""
  nano = load_config_file(Path(__file__).with_name("nano.py"))
  data = dataclasses.replace(nano.data, chat=ChatDataConfig(
      path=CHATS, val_conversations=64, too_long="drop"))
  train = dataclasses.replace(
      nano.train, init_from=BASE_RUN, steps=240, batch_size=8, context_len=512, eval_every=60,
      ckpt_every=60, sample_prompt="Tell me a story about a little dog.", sample_tokens=160)
  return dataclasses.replace(
      nano, data=data, train=train, run_dir="runs/nano_chat",
      # A tenth of pre-training's rate: the base already speaks; warmup lets Adam's moments settle.
      optim=OptimConfig(lr=1e-4, min_lr=1e-5, warmup_steps=20),
      # LoRA instead of full fine-tuning: configs/finetune_nano_chat_lora.py.
  )
