"""Offline distillation's precompute: the teacher run once over every training window, its top-k
log-probs or k sampled ids stored by window index (data/teacher_rows.py) for the trainer to read.

This is how a big teacher (gpt-oss-20b, MXFP4 experts kept) teaches on a small machine: the
teacher and the student never need to fit in memory together. Sampled rows draw each window's
ids from a key folded from its index, so they do not depend on how the precompute batches them.
"""

import logging

import jax
import numpy as np
from flax import nnx

from nanogptoss_jax.data import teacher_rows
from nanogptoss_jax.data.bpe import use_bpe_file
from nanogptoss_jax.data.streams import prepare_data
from nanogptoss_jax.data.windows import window_count
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.progress import progress_bar
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.distillation import sample_teacher, top_k_teacher
from nanogptoss_jax.training.run_config import RunConfig, validate_run_config
from nanogptoss_jax.training.teacher import (SAMPLE_SEED, cache_key, load_teacher,
                                             student_mapping, teacher_log_probs)


def rows_function(graphdef, mapping, cfg: RunConfig):
  """jitted (teacher state, inputs [n, T], window indices [n]) -> {field: [n, T, K]}."""
  train, vocab = cfg.train, cfg.model.vocab_size

  def rows(state, inputs, window_indices):
    teacher = nnx.merge(graphdef, state)
    log_probs = teacher_log_probs(teacher, {"inputs": inputs}, mapping, vocab)  # [n, T, V]
    if train.kd_mode == "top_k":
      top = top_k_teacher(log_probs, train.kd_k)
      return {"ids": top.ids, "log_probs": top.log_probs}

    def one_window(index, window_log_probs):  # its own key: batching does not change the draw
      key = jax.random.fold_in(jax.random.key(SAMPLE_SEED), index)
      drawn = sample_teacher(key, window_log_probs[None], train.kd_k, train.kd_temperature)
      return {"ids": drawn.ids[0], "log_probs": drawn.log_probs[0],
              "proposal_log_probs": drawn.proposal_log_probs[0]}
    return jax.vmap(one_window)(window_indices, log_probs)

  return jax.jit(rows)


def precompute(cfg: RunConfig, batch_windows: int | None = None, progress: bool = True):
  """Writes the teacher cache the run `cfg` (kd_mode top_k or sampled) reads; returns its
  folder. batch_windows: windows per teacher call (default train.batch_size)."""
  validate_run_config(cfg)
  train = cfg.train
  if not train.teacher or train.kd_mode == "online":
    raise UserError(f"a teacher cache needs train.teacher and train.kd_mode top_k or sampled "
                    f"(got teacher={train.teacher!r}, kd_mode={train.kd_mode!r})")
  record = weights.describe_source(train.teacher, field="train.teacher")
  if cfg.data.tokenizer_path:
    use_bpe_file(cfg.data.tokenizer_path)
  tokenizer, stream, _ = prepare_data(cfg.data)
  folder = teacher_rows.cache_dir(cfg.data.cache_dir, cache_key(cfg, stream), record["sha256"])
  if teacher_rows.is_finished(folder):  # the same key is the same rows: nothing to recompute
    logging.info("teacher cache: %s is already there (this data, teacher, mode and k)", folder)
    return folder
  model, teacher_tokenizer = load_teacher(cfg)
  mapping = student_mapping(teacher_tokenizer, tokenizer, model.cfg.vocab_size,
                            cfg.model.vocab_size)
  graphdef, state = nnx.split(model)
  rows = rows_function(graphdef, mapping, cfg)
  length, count = train.context_len, window_count(stream, train.context_len)
  step = batch_windows or train.batch_size
  offsets = np.arange(length)

  def fill(arrays):
    for start in progress_bar(range(0, count, step), unit="batch", disable=not progress):
      # A short last batch repeats its final window, so every call has one compiled shape.
      indices = np.minimum(np.arange(start, start + step), count - 1)
      inputs = stream.ids[indices[:, None] * length + offsets].astype(np.int32)  # [n, T]
      out = jax.device_get(rows(state, inputs, indices))
      kept = slice(0, min(step, count - start))
      for name, array in arrays.items():
        array[start:start + step] = out[name][kept]

  folder = teacher_rows.write_rows(cfg.data.cache_dir, cache_key(cfg, stream), record, count,
                                   length, fill)
  logging.info("teacher cache: %d windows x %d tokens x k=%d in %s", count, length, train.kd_k,
               folder)
  return folder
