"""Run configs: what to train on, how to optimise, how long; `configs/<name>.py` build these."""

import dataclasses
from pathlib import PurePosixPath

from nanogptoss_jax.config import Gpt2Config, GptOssConfig

FULL_VOCAB_SIZE = 201088  # o200k_harmony's n_vocab


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it becomes tokens."""

  # A hub dataset id, a local dataset directory (anything `datasets.load_dataset` reads), a
  # `.txt` file with `<|endoftext|>` separators, or a directory holding `*train*.txt`/`*valid*.txt`.
  path: str = "roneneldan/TinyStories"
  train_split: str = "train"
  val_split: str = "validation"
  text_column: str = "text"
  # Tokenised streams are cached here (uint32, memory-mapped), keyed by source and tokenizer.
  cache_dir: str = ".cache/nanogptoss"
  # 0: the full o200k_harmony vocabulary. N > 0: a lossless compact vocabulary of N ids.
  compact_vocab_size: int = 0
  # Validation uses this many fixed windows (fewer if the split is short).
  val_windows: int = 64
  # Cap on stories read per split (0: all); handy to try the full hub dataset quickly.
  max_stories: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay to min_lr; decay on matrices only."""

  lr: float = 3e-4
  min_lr: float = 3e-5
  warmup_steps: int = 100
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0  # global norm; 0 turns clipping off


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop length, batch shape, cadence of evals/checkpoints, MoE auxiliary losses, mesh."""

  steps: int = 1000
  batch_size: int = 16  # sequences per optimiser step, across all devices and micro-batches
  grad_accum: int = 1  # micro-batches per step
  context_len: int = 256
  seed: int = 0
  log_every: int = 10
  eval_every: int = 100
  ckpt_every: int = 200
  keep_checkpoints: int = 3
  sample_prompt: str = "Once upon a time"
  sample_tokens: int = 48
  load_balance_coef: float = 0.01  # Switch-Transformer auxiliary loss
  router_z_coef: float = 0.001  # ST-MoE router z-loss
  fsdp: int = 1  # size of the mesh's fsdp axis; the data axis takes the remaining devices


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one training run needs; saved with its checkpoints."""

  model: GptOssConfig | Gpt2Config
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  run_dir: str = "runs/default"


# A GPT-2 twin's run_dir: the GPT-OSS run's folder name, prefixed (runs/nano -> runs/gpt2_nano).
GPT2_RUN_PREFIX = "gpt2_"


def gpt2_twin(run: RunConfig) -> RunConfig:
  """The GPT-2 baseline of a GPT-OSS run: same depth, width, heads, vocab, data, optimiser."""
  model = run.model
  if not isinstance(model, GptOssConfig):
    raise TypeError(f"gpt2_twin needs a GPT-OSS run, got a {type(model).__name__} model")
  gpt2 = Gpt2Config(
      num_hidden_layers=model.num_hidden_layers,
      vocab_size=model.vocab_size,
      hidden_size=model.hidden_size,
      num_attention_heads=model.num_attention_heads,
      intermediate_size=None,  # 4 * hidden_size, GPT-2's own ratio
      # Exactly the training window: positions past it would get no gradient, only weight decay.
      max_position_embeddings=run.train.context_len,
      dropout=0.0,  # as GPT-OSS, which has no dropout
      param_dtype=model.param_dtype,
      dtype=model.dtype,
  )
  run_dir = PurePosixPath(run.run_dir)
  return dataclasses.replace(run, model=gpt2,
                             run_dir=str(run_dir.with_name(GPT2_RUN_PREFIX + run_dir.name)))
