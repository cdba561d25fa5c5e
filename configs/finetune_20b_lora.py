"""QLoRA fine-tuning of gpt-oss-20b on HuggingFaceH4/Multilingual-Thinking, with the
hyper-parameters of OpenAI's TRL recipe ("Fine-tuning with gpt-oss and Hugging Face
Transformers"): LoRA r 8, alpha 16 on attention's projections and on the experts of layers 7,
15 and 23, lr 2e-4, 2,048 tokens, cosine decay to a tenth after a 3% warmup, 16 conversations
per step in micro-batches of 4, one epoch of the 1,000 conversations.

The experts stay as published (MXFP4 blocks and scales, decoded inside the step); nothing but
the adapters trains. Sized for one GPU: `--config.train.init_from=DIR` reads a local copy.
"""

from nanogptoss_jax.data.config import ChatDataConfig, DataConfig
from nanogptoss_jax.model.config import GPT_OSS_20B
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.lora import LoraConfig
from nanogptoss_jax.training.run_config import OptimConfig, RunConfig, TrainConfig

CONVERSATIONS = 1000  # HuggingFaceH4/Multilingual-Thinking's one split
HELD_OUT = 50
BATCH = 16


def get_config() -> RunConfig:
  steps = (CONVERSATIONS - HELD_OUT) // BATCH  # one epoch
  return RunConfig(
      model=GPT_OSS_20B,
      # What benchmarks/finetune_memory.py measures: scanned layers, each recomputed in the
      # backward pass; the loss in token chunks (never all [T, V] logits); experts a block at a
      # time (moe_impl auto is `looped` at these widths).
      # 15.0 GB on an H100 for batch 1 x 2,048; `--config.execution.dense_format=int8` stores
      # the frozen embedding and attention kernels as int8 too: 13.7 GB (docs/benchmarks.md).
      execution=ExecutionConfig(param_dtype="bfloat16", dtype="bfloat16", expert_format="mxfp4",
                                remat="block", layers_impl="scan", loss_impl="chunked"),
      data=DataConfig(chat=ChatDataConfig(
          path="HuggingFaceH4/Multilingual-Thinking", val_split="", val_conversations=HELD_OUT,
          too_long="drop")),
      optim=OptimConfig(lr=2e-4, min_lr=2e-5, warmup_steps=max(1, round(0.03 * steps)),
                        weight_decay=0.0),
      train=TrainConfig(
          steps=steps, batch_size=BATCH, grad_accum=4, context_len=2048, eval_every=20,
          ckpt_every=20, sample_prompt="¿Cuál es la capital de Australia?", sample_tokens=256,
          init_from="openai/gpt-oss-20b"),
      # Only the adapters train: r 8, alpha 16 on q, k, v, o of every layer and on both expert
      # matrices of layers 7, 15 and 23 (the recipe's target_parameters); `expert_layers=()`
      # adapts every layer's experts (1.1 GB more of adapters and moments).
      lora=LoraConfig(rank=8, alpha=16, expert_layers=(7, 15, 23)),
      run_dir="runs/finetune_20b_lora",
  )
