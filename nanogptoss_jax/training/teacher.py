"""Distillation in the trainer: the run's teacher (`train.teacher`), its loss and its train step.

Online, the frozen teacher runs inside the same jitted step as the student: its weights are a
non-donated argument of the step, outside the train state, so they get no gradients and no
optimiser state and are never written to checkpoints (which record their content hash instead,
checked on resume as `init_from`'s is). Offline (`kd_mode` top_k or sampled), the step reads the
teacher's rows that `teacher_cache.precompute` wrote, drawn with their windows by the data
iterator. Either way the loss is distillation.py's, averaged over the tokens the batch's weights
train, and the validation loss stays the student's plain cross-entropy.

A teacher with another vocabulary (a full-o200k gpt-oss over a compact student) reaches the
student's ids through `vocab_map` / `fold_to_student`: mass on an id the student lacks goes to the
first byte of its spelling.
"""

import functools
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.data import teacher_rows
from nanogptoss_jax.data.windows import make_train_iterator
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import axes
from nanogptoss_jax.parallel import rules
from nanogptoss_jax.parallel.mesh import batch_shards
from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.distillation import (DenseTeacher, SampledTeacher, TopKTeacher,
                                                   distillation_loss, fold_to_student, vocab_map)
from nanogptoss_jax.training.losses import as_batch, with_moe_aux
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.step import make_train_step

TEACHER_KEY = "teacher"  # in a checkpoint's source record: {"path", "sha256"}
SAMPLE_SEED = 0  # offline sampled draws: one fixed stream, so every student seed reads the same


def load_teacher(cfg: RunConfig, mesh=None):
  """(teacher model in eval mode, its tokenizer): a run directory's best checkpoint, or a
  published gpt-oss directory with its MXFP4 experts kept 4-bit (a teacher never trains)."""
  root = pathlib.Path(cfg.train.teacher)
  if weights.is_run_directory(root):
    model, tokenizer = weights.load_checkpoint(root)
  else:
    from nanogptoss_jax.pretrained.load import load_pretrained  # noqa: PLC0415 - heavy, rare
    execution = cfg.execution.replace(expert_format="mxfp4", layers_impl="loop", remat="none")
    model, tokenizer = load_pretrained(str(root), execution=execution, mesh=mesh)
  model.eval()
  return model, tokenizer


def student_mapping(teacher_tokenizer, student_tokenizer, teacher_vocab: int,
                    student_vocab: int) -> np.ndarray | None:
  """vocab_map from the teacher's ids onto the student's; None when it is the identity."""
  mapping = vocab_map(teacher_tokenizer, student_tokenizer, teacher_vocab)
  if teacher_vocab == student_vocab and np.array_equal(mapping, np.arange(student_vocab)):
    return None
  if mapping.max() >= student_vocab:
    raise UserError(f"train.teacher's ids map onto student id {int(mapping.max())}, past the "
                    f"student's vocabulary of {student_vocab}: the two tokenizers do not match")
  return mapping


def teacher_log_probs(teacher, batch: dict, mapping, student_vocab: int, moe_groups: int = 1):
  """The teacher's logits [B, T, V_student] on a batch's inputs (log-probs folded onto the
  student's ids when the vocabularies differ); no gradient flows into the teacher."""
  logits = teacher.forward(batch["inputs"], batch.get("positions"), moe_groups=moe_groups).logits
  logits = jax.lax.stop_gradient(logits)
  return logits if mapping is None else fold_to_student(logits, mapping, student_vocab)


def kd_loss(teacher_of, model, batch, cfg: RunConfig, moe_groups: int = 1):
  """A train-step loss_fn: (1 - alpha) CE + alpha tau^2 KL over the counted tokens, plus the
  MoE's auxiliary losses; teacher_of(batch) gives the teacher's form (distillation.py)."""
  batch = as_batch(batch)
  out = model.forward(batch["inputs"], batch.get("positions"), moe_groups=moe_groups)
  weights_ = batch.get("weights")
  weights_ = jnp.ones(batch["targets"].shape, jnp.float32) if weights_ is None else weights_
  loss, parts = distillation_loss(out.logits, batch["targets"], weights_, teacher_of(batch),
                                  alpha=cfg.train.kd_alpha, temperature=cfg.train.kd_temperature)
  total, metrics = with_moe_aux(loss, out.aux, cfg)
  return total, {"loss": loss, "ce": parts["ce"], "kl": parts["kl"], **metrics}


def cached_teacher(batch: dict, mode: str, temperature: float):
  """The teacher's form from the rows an offline cache put in the batch."""
  if mode == "top_k":
    return TopKTeacher(ids=batch["teacher_ids"], log_probs=batch["teacher_log_probs"])
  return SampledTeacher(ids=batch["teacher_ids"], log_probs=batch["teacher_log_probs"],
                        proposal_log_probs=batch["teacher_proposal_log_probs"],
                        temperature=temperature)


def cache_key(cfg: RunConfig, stream) -> dict:
  """What an offline cache's rows depend on besides the teacher (teacher_rows.data_key)."""
  train = cfg.train
  extra = ({"temperature": train.kd_temperature, "sample_seed": SAMPLE_SEED}
           if train.kd_mode == "sampled" else {})
  return teacher_rows.data_key(teacher_rows.stream_digest(stream), train.context_len,
                               train.kd_mode, train.kd_k, extra)


def check_teacher(saved_source: dict | None, current: dict) -> None:
  """Raises unless the teacher a resumed run recorded still holds the same bytes."""
  saved = (saved_source or {}).get(TEACHER_KEY)
  if saved is not None and saved["sha256"] != current["sha256"]:
    raise weights.SourceError(
        f"train.teacher={current['path']} changed since this run started (sha256 "
        f"{saved['sha256'][:12]}... then, {current['sha256'][:12]}... now): the rest of the run "
        "would learn from another teacher. Put the original back, or start a new "
        "--config.run_dir (nothing was deleted)")


class Distillation:
  """A run's teacher, if any: what its checkpoints record, its train step and its batches."""

  def __init__(self, cfg: RunConfig, mesh, tokenizer, resume_meta: dict | None = None):
    self.cfg, self.mesh, self.tokenizer = cfg, mesh, tokenizer
    self.record, self.teacher_state, self.rows = None, None, None
    if not cfg.train.teacher:
      return
    self.record = weights.describe_source(cfg.train.teacher, field="train.teacher")
    check_teacher((resume_meta or {}).get(ckpt.SOURCE_KEY), self.record)
    if cfg.train.kd_mode == "online":
      model, teacher_tokenizer = load_teacher(cfg, mesh)
      self.mapping = student_mapping(teacher_tokenizer, tokenizer, model.cfg.vocab_size,
                                     cfg.model.vocab_size)
      self.teacher_graphdef, state = nnx.split(model)
      self.teacher_shardings = rules.tree_shardings(mesh, state, axes.axes_by_path(model))
      self.teacher_state = jax.device_put(state, self.teacher_shardings)
      logging.info("online teacher %s (sha256 %s...)", cfg.train.teacher,
                   self.record["sha256"][:12])

  def source(self, init_source: dict | None) -> dict | None:
    """The checkpoints' source record: init_from's, and the teacher's under TEACHER_KEY."""
    if self.record is None:
      return init_source
    return (init_source or {}) | {TEACHER_KEY: self.record}

  def train_iterator(self, data):
    """The run's data iterator (training/run_data.py's RunData): its own, or with an offline
    teacher its windows with the teacher's cached rows."""
    train = self.cfg.train
    if not train.teacher or train.kd_mode == "online":
      return data.iterator
    if data.train_stream is None:
      raise UserError(f"train.kd_mode={train.kd_mode!r} reads a teacher cache keyed by text "
                      "window; chat data distils online only: set --config.train.kd_mode=online")
    self.rows = teacher_rows.open_rows(self.cfg.data.cache_dir,
                                       cache_key(self.cfg, data.train_stream), self.record)
    return make_train_iterator(data.train_stream, train.context_len, train.batch_size,
                               train.seed, rows=self.rows.rows,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())

  def jit_train_step(self, graphdef, tx, state_shardings, batch_sharding):
    """The jitted train_step(state, batch) -> (state, metrics), the teacher's part included."""
    cfg, mesh = self.cfg, self.mesh
    options = dict(out_shardings=(state_shardings, None), donate_argnums=0)
    if self.teacher_state is None:
      loss_fn = None  # the run's train.loss
      if cfg.train.teacher:
        loss_fn = functools.partial(kd_loss, functools.partial(
            cached_teacher, mode=cfg.train.kd_mode, temperature=cfg.train.kd_temperature))
      return jax.jit(make_train_step(graphdef, cfg, tx, mesh, loss_fn),
                     in_shardings=(state_shardings, batch_sharding), **options)
    groups, vocab, mapping = batch_shards(mesh), cfg.model.vocab_size, self.mapping

    def step(state, batch, teacher_state):
      def teacher_of(micro_batch):
        teacher = nnx.merge(self.teacher_graphdef, teacher_state)
        return DenseTeacher(teacher_log_probs(teacher, micro_batch, mapping, vocab, groups))
      return make_train_step(graphdef, cfg, tx, mesh, functools.partial(kd_loss, teacher_of))(
          state, batch)

    jitted = jax.jit(step, in_shardings=(state_shardings, batch_sharding,
                                         self.teacher_shardings), **options)
    return lambda state, batch: jitted(state, batch, self.teacher_state)
