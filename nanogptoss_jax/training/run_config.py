"""Run configs: what to train on, how to optimise, how long; `configs/<name>.py` build these."""

import dataclasses
import re
from pathlib import PurePosixPath

from nanogptoss_jax import o200k
from nanogptoss_jax.data.config import DataConfig
from nanogptoss_jax.model.config import ConfigError, Gpt2Config, GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.lora import LoraConfig
from nanogptoss_jax.model.registry import ModelConfig
from nanogptoss_jax.training.losses import LOSSES


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
  wandb_project: str = ""  # a Weights & Biases project to log to as well (the wandb extra)
  loss: str = "next_token"  # training/losses.py LOSSES
  # A regular expression over dotted parameter paths: only matching nnx.Params train (get
  # gradients and optimiser state); "" trains every parameter.
  trainable: str = ""
  # Start from these weights instead of the seed: a run directory or a published gpt-oss
  # checkpoint directory. Parameters the source lacks (adapters) keep their initial values.
  init_from: str = ""
  # Distillation (training/teacher.py): a run directory or a published gpt-oss directory (MXFP4
  # experts kept) whose model teaches; "" trains on the labels alone. Per counted token the loss
  # is (1 - kd_alpha) CE + kd_alpha tau^2 KL(teacher_tau || student_tau), tau = kd_temperature.
  teacher: str = ""
  kd_mode: str = "online"  # KD_MODES: the teacher runs in the step, or its rows are read
  kd_alpha: float = 0.5
  kd_temperature: float = 1.0
  kd_k: int = 32  # ids per token an offline cache holds (top-k, or samples drawn)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one training run needs; saved with its checkpoints. `model` is what is trained
  (the architecture), `execution` how it runs (dtypes, kernels, layouts, mesh)."""

  model: ModelConfig
  execution: ExecutionConfig = ExecutionConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  run_dir: str = "runs/default"
  # LoRA adapters (model/lora.py) on the model; then only they train unless train.trainable
  # says otherwise, and checkpoints hold them without the base.
  lora: LoraConfig | None = None


# online: the frozen teacher runs inside the jitted step; top_k / sampled: its rows are read from
# a cache that `python -m nanogptoss_jax.commands.teacher_cache` wrote (training/teacher_cache.py).
KD_MODES = ("online", "top_k", "sampled")

# A GPT-2 twin's run_dir: the GPT-OSS run's folder name, prefixed (runs/nano -> runs/gpt2_nano).
GPT2_RUN_PREFIX = "gpt2_"


def gpt2_twin(run: RunConfig) -> RunConfig:
  """The GPT-2 baseline of a GPT-OSS run: same depth, width, heads, vocab, data, optimiser."""
  model = run.model
  if not isinstance(model, GptOssConfig):
    raise ConfigError(f"a GPT-2 twin needs a GPT-OSS run, got a {type(model).__name__} model")
  gpt2 = Gpt2Config(
      num_hidden_layers=model.num_hidden_layers,
      vocab_size=model.vocab_size,
      hidden_size=model.hidden_size,
      num_attention_heads=model.num_attention_heads,
      intermediate_size=None,  # 4 * hidden_size, GPT-2's own ratio
      # Exactly the training window: positions past it would get no gradient, only weight decay.
      max_position_embeddings=run.train.context_len,
      dropout=0.0,  # as GPT-OSS, which has no dropout
  )
  run_dir = PurePosixPath(run.run_dir)
  return dataclasses.replace(run, model=gpt2,
                             run_dir=str(run_dir.with_name(GPT2_RUN_PREFIX + run_dir.name)))


def _run_rules(cfg: RunConfig) -> list[tuple[bool, str]]:
  """(holds, message) for each cross-field rule of a run; messages name fields and values."""
  data, optim, train, model = cfg.data, cfg.optim, cfg.train, cfg.model
  vocab = data.compact_vocab_size if data.compact_vocab_size > 0 else o200k.VOCAB_SIZE
  vocab_source = ("data.compact_vocab_size" if data.compact_vocab_size > 0
                  else f"{o200k.ENCODING_NAME}'s size (data.compact_vocab_size=0)")
  return [
      (model.vocab_size == vocab,
       f"model.vocab_size={model.vocab_size} must equal {vocab_source}={vocab}"),
      (0 <= data.compact_vocab_size <= o200k.VOCAB_SIZE,
       f"data.compact_vocab_size={data.compact_vocab_size} must be in [0, {o200k.VOCAB_SIZE}]"),
      (data.val_windows > 0, f"data.val_windows={data.val_windows} must be > 0"),
      (data.max_stories >= 0, f"data.max_stories={data.max_stories} must be >= 0 (0: all)"),
      (train.steps > 0, f"train.steps={train.steps} must be > 0"),
      (train.grad_accum > 0, f"train.grad_accum={train.grad_accum} must be > 0"),
      (train.batch_size > 0 and train.batch_size % max(train.grad_accum, 1) == 0,
       f"train.batch_size={train.batch_size} must be a positive multiple of "
       f"train.grad_accum={train.grad_accum}"),
      (train.context_len > 0, f"train.context_len={train.context_len} must be > 0"),
      (train.log_every > 0, f"train.log_every={train.log_every} must be > 0"),
      (train.eval_every > 0, f"train.eval_every={train.eval_every} must be > 0"),
      (train.ckpt_every > 0, f"train.ckpt_every={train.ckpt_every} must be > 0"),
      (train.keep_checkpoints > 0,
       f"train.keep_checkpoints={train.keep_checkpoints} must be > 0"),
      (train.sample_tokens >= 0, f"train.sample_tokens={train.sample_tokens} must be >= 0"),
      (train.load_balance_coef >= 0 and train.router_z_coef >= 0,
       f"train.load_balance_coef={train.load_balance_coef} and "
       f"train.router_z_coef={train.router_z_coef} must be >= 0"),
      (train.loss in tuple(LOSSES), f"train.loss={train.loss!r} must be one of {tuple(LOSSES)}"),
      (_is_regex(train.trainable),
       f"train.trainable={train.trainable!r} must be a regular expression over parameter paths"),
      (train.kd_mode in KD_MODES, f"train.kd_mode={train.kd_mode!r} must be one of {KD_MODES}"),
      (0 <= train.kd_alpha <= 1, f"train.kd_alpha={train.kd_alpha} must be in [0, 1]"),
      (train.kd_temperature > 0, f"train.kd_temperature={train.kd_temperature} must be > 0"),
      (train.kd_k > 0, f"train.kd_k={train.kd_k} must be > 0"),
      (optim.lr > 0, f"optim.lr={optim.lr} must be > 0"),
      (0 <= optim.min_lr <= optim.lr,
       f"optim.min_lr={optim.min_lr} must be in [0, optim.lr={optim.lr}]"),
      # warmup_steps may exceed train.steps: the schedule clips it.
      (optim.warmup_steps >= 0, f"optim.warmup_steps={optim.warmup_steps} must be >= 0"),
      (optim.weight_decay >= 0, f"optim.weight_decay={optim.weight_decay} must be >= 0"),
      (0 <= optim.beta1 < 1 and 0 <= optim.beta2 < 1,
       f"optim.beta1={optim.beta1} and optim.beta2={optim.beta2} must be in [0, 1)"),
      (optim.eps > 0, f"optim.eps={optim.eps} must be > 0"),
      (optim.grad_clip >= 0, f"optim.grad_clip={optim.grad_clip} must be >= 0 (0: off)"),
      (bool(cfg.run_dir.strip()), "run_dir must not be empty"),
      (cfg.lora is None or isinstance(model, GptOssConfig),
       f"lora adapts GPT-OSS models only (this run trains a {type(model).__name__}); "
       "set --config.lora=none"),
      (cfg.execution.dense_format == "float" or (cfg.lora is not None
                                                  and isinstance(model, GptOssConfig)),
       "execution.dense_format='int8' stores GPT-OSS's embedding and attention kernels frozen: "
       "train LoRA adapters over them (set lora) or use execution.dense_format='float'"),
      *model.run_rules(train.context_len),
  ]


def _is_regex(pattern: str) -> bool:
  try:
    re.compile(pattern)
  except re.error:
    return False
  return True


def validate_run_config(cfg: RunConfig) -> None:
  """Raises ConfigError listing every cross-field rule that `cfg` breaks."""
  broken = [message for holds, message in _run_rules(cfg) if not holds]
  if broken:
    raise ConfigError("invalid run config:\n  " + "\n  ".join(broken))
