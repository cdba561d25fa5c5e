"""The training loop: data, mesh, jitted step, evals, samples, logs, checkpoints, resume."""

import logging
import math
import pathlib
import signal
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from nanogptoss_jax.data.bpe import use_bpe_file
from nanogptoss_jax.data.tokenizer import Tokenizer
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import evaluation
from nanogptoss_jax.parallel.mesh import make_mesh
from nanogptoss_jax.progress import progress_bar
from nanogptoss_jax.training import faults, weights
from nanogptoss_jax.training import mesh as sharding
from nanogptoss_jax.training.metrics_log import MetricsLog
from nanogptoss_jax.training.optimizer import lr_schedule
from nanogptoss_jax.training.resume import check_resumable
from nanogptoss_jax.training.run_config import RunConfig, validate_run_config
from nanogptoss_jax.training.run_data import open_run_data
from nanogptoss_jax.training.state import abstract_train_state, merge_model
from nanogptoss_jax.training.step import make_eval_step
from nanogptoss_jax.training.stop_request import StopRequest
from nanogptoss_jax.training.teacher import Distillation

PLOT_FILE = "loss.png"
RECENT_LOSSES_KEY = "recent_train_losses"  # in a checkpoint's metrics


class TrainingDivergedError(UserError, RuntimeError):
  """The loss became NaN or Inf."""


class Trainer:
  """One training run; `run()` trains (or resumes) to cfg.train.steps and returns final metrics."""

  def __init__(self, cfg: RunConfig, *, progress: bool = True):
    sharding.maybe_initialize_distributed()
    validate_run_config(cfg)
    self.cfg, self.progress = cfg, progress
    self.run_dir = pathlib.Path(cfg.run_dir)
    self.is_main = jax.process_index() == 0
    self.run_dir.mkdir(parents=True, exist_ok=True)
    self.checkpoints = ckpt.RunCheckpoints(self.run_dir, cfg.train.keep_checkpoints)
    try:
      self._prepare(cfg)
    except BaseException:
      self.checkpoints.remove_if_empty()  # a run that never started leaves no empty folders
      raise

  def _prepare(self, cfg: RunConfig) -> None:
    self.log = MetricsLog(self.run_dir, self.is_main, cfg)
    # The BPE file: the one named in the config, else the copy the run directory carries.
    if cfg.data.tokenizer_path:
      use_bpe_file(cfg.data.tokenizer_path)
    ckpt.use_run_tokenizer_file(self.run_dir)

    resume = self._read_resume_meta()
    # A resumed run reads in its saved vocabulary; a run from another run's weights in that one's.
    known = (Tokenizer.from_dict(resume["tokenizer"]) if resume
             else weights.source_tokenizer(cfg))
    self.data = open_run_data(cfg, known)
    self.tokenizer = self.data.tokenizer

    self.mesh = make_mesh(cfg.execution)
    self.graphdef, abstract_state, tx = abstract_train_state(cfg)
    self.state_shardings = weights.state_shardings(cfg, self.mesh, abstract_state)
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
    if micro_batch % self.mesh.size:
      raise ConfigError(
          f"a micro-batch of train.batch_size={cfg.train.batch_size} / train.grad_accum="
          f"{cfg.train.grad_accum} = {micro_batch} rows cannot be split evenly over "
          f"{self.mesh.size} devices; make it a multiple of {self.mesh.size}")
    self.batch_sharding = NamedSharding(self.mesh, P(None, sharding.BATCH_AXES))  # [accum, B, T]
    self.eval_sharding = sharding.batch_sharding(self.mesh)
    self.distill = Distillation(cfg, self.mesh, self.tokenizer, resume)  # the teacher, if any
    self.train_step = self.distill.jit_train_step(self.graphdef, tx, self.state_shardings,
                                                  self.batch_sharding)
    eval_fn = make_eval_step(self.graphdef, self.mesh)
    self.eval_step = jax.jit(eval_fn, in_shardings=(
        self.state_shardings.params, self.state_shardings.frozen, self.state_shardings.rest,
        self.eval_sharding))
    self.data_iter = self.data.iterator = self.distill.train_iterator(self.data)
    self.best_val = math.inf
    self._recent_losses = []  # train losses since the last eval
    if resume:
      step, state, data_state, meta = ckpt.restore(
          self.checkpoints.periodic, jax.tree.map(
              lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
              self.state_shardings))
      self.source = meta.get(ckpt.SOURCE_KEY)
      state = weights.restored_state(cfg, state, meta)  # frozen weights rebuilt, source checked
      # A step converted from the other layer layout comes back on one device: spread it.
      self.state = jax.device_put(state, self.state_shardings)
      self.data_iter.set_state(data_state)
      self.checkpoints.set_aside_newer_than(step)
      # After falling back past an unreadable step, the best checkpoint may be newer (and
      # better) than the step resumed from: a worse validation loss must not replace it.
      self.best_val = min(meta["metrics"].get("best_val_loss", math.inf),
                          self.checkpoints.best_val_loss())
      self.log.truncate_after(step)
      # The train losses since the last eval, so the next eval row's mean spans the resume.
      self._recent_losses = list(meta["metrics"].get(RECENT_LOSSES_KEY, []))
      logging.warning("resumed from step %d in %s", step, self.run_dir)
    else:
      self.log.set_aside()  # a run that crashed before its first checkpoint left rows there
      self.source = self.distill.source(weights.source_record(cfg))
      self.state = weights.initial_state(cfg, tx, self.state_shardings)
    self.lr_schedule = lr_schedule(cfg.optim, cfg.train.steps)
    self._tokens_per_s = 0.0
    self._reset_clock()

  def _read_resume_meta(self) -> dict | None:
    if self.checkpoints.latest_step() is None:
      return None
    _, _, _, meta = ckpt.restore(self.checkpoints.periodic, None, meta_only=True)
    check_resumable(self.cfg, meta["config"], self.run_dir)
    return meta

  @property
  def step(self) -> int:
    return int(self.state.step)

  @property
  def tokens_per_step(self) -> int:
    return self.cfg.train.batch_size * self.cfg.train.context_len

  def model(self):
    """The current model (a view on the train state's arrays)."""
    return merge_model(self.graphdef, self.state)

  def _next_batch(self):
    """This step's batch [accum, B / accum, ...] (token windows or chat dicts), placed."""
    return self.data.next_batch(self.cfg.train.grad_accum, self.batch_sharding)

  def evaluate(self) -> dict:
    """val_loss (nats per counted token) over the fixed validation batches; val_bpb for text."""
    return evaluation.evaluate(self.eval_step, self.state, self.data, self.eval_sharding,
                               self.step)

  def sample(self) -> str:
    return evaluation.sample(self.model(), self.tokenizer, self.cfg, self.step)

  def _save(self, metrics: dict, best: bool = False) -> None:
    if self.is_main:
      ckpt.carry_tokenizer_file(self.run_dir)
    meta = ckpt.make_meta(self.cfg, self.tokenizer, self.step,
                          metrics | {"best_val_loss": self.best_val,
                                     RECENT_LOSSES_KEY: list(self._recent_losses)}, self.source)
    self.checkpoints.save(self.step, self.state, self.data_iter.get_state(), meta, best=best)
    faults.maybe_kill("checkpoint_write", self.step)  # Orbax writes in a background thread
    faults.maybe_kill("after_save", self.step, before=self.checkpoints.wait)

  def run(self, until: int | None = None) -> dict:
    """Trains to cfg.train.steps and returns the last metrics.

    Stops early, after saving, at step `until` (to train in slices, e.g. from a notebook) or on
    SIGTERM/SIGINT; the same config then resumes exactly where it stopped.
    """
    cfg = self.cfg.train
    until = min(until or cfg.steps, cfg.steps)
    if self.step >= cfg.steps:
      logging.info("run in %s is already at step %d of %d", self.run_dir, self.step, cfg.steps)
      return self._finish(self.evaluate())
    self.bar = progress_bar(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True,
                            disable=not (self.progress and self.is_main))
    last, pending = {}, None  # pending: (step, device metrics), fetched after the next dispatch
    multiprocess = jax.process_count() > 1
    signals = (signal.SIGINT,) if multiprocess else (signal.SIGTERM, signal.SIGINT)
    with StopRequest(signals) as stop:
      while self.step < until and not stop.requested:
        first = pending is None and not last
        self.state, metrics = self.train_step(self.state, self._next_batch())
        faults.maybe_kill("mid_step", self.step)
        if first:
          self._reset_clock()  # the first call compiled; don't count that as training time
        if pending:
          last = self._record(*pending)
        pending, step = (self.step, metrics), self.step
        # SIGTERM to any process (JAX's preemption service listens for it) stops every process
        # at the same step, the first one all of them reach after the notice.
        if multiprocess and multihost_utils.reached_preemption_sync_point(step):
          stop.requested = True
        at_eval = step % cfg.eval_every == 0 or step == cfg.steps
        if at_eval or step % cfg.ckpt_every == 0 or step == until or stop.requested:
          # Only a state whose loss was seen finite is evaluated or saved.
          last, pending = self._record(*pending), None
          if at_eval:
            last |= self._eval_and_log(step)
          else:
            self._save(last)
          self._reset_clock()
    self.bar.close()
    if self.step < cfg.steps:
      logging.warning("stopped: step %d saved in %s; rerun the same command to resume",
                      self.step, self.run_dir)
      self.checkpoints.wait()
      return last
    return self._finish(last)

  def _reset_clock(self) -> None:
    self._clock, self._clock_step = time.perf_counter(), self.step

  def _record(self, step: int, metrics: dict) -> dict:
    """Fetches one step's metrics, stops on NaN/Inf, logs every log_every steps."""
    metrics = jax.device_get(metrics)
    loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      self.checkpoints.wait()
      saved = self.checkpoints.latest_step()
      raise TrainingDivergedError(
          f"loss became {loss} at step {step} (grad norm {grad_norm}). The last good checkpoint "
          f"({'step ' + str(saved) if saved is not None else 'none yet'}) in {self.run_dir} is "
          f"intact. Try a lower --config.optim.lr or a longer --config.optim.warmup_steps, then "
          f"rerun the same command: it resumes from that checkpoint.")
    self._recent_losses.append(loss)
    row = {"step": step, "tokens": step * self.tokens_per_step, "loss": loss,
           "grad_norm": grad_norm, "lr": float(self.lr_schedule(step - 1))}
    for key in ("load_balance_loss", "router_z_loss", "ce", "kl"):  # ce, kl: distillation's
      if key in metrics:
        row[key] = float(metrics[key])
    if "expert_load" in metrics:
      row["expert_load"] = np.round(metrics["expert_load"], 4).tolist()  # [L, E]
    elapsed = time.perf_counter() - self._clock
    if step > self._clock_step and elapsed > 0:
      self._tokens_per_s = (step - self._clock_step) * self.tokens_per_step / elapsed
    row["tokens_per_s"] = self._tokens_per_s
    self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self._tokens_per_s:,.0f}", refresh=False)
    self.bar.update(step - self.bar.n)  # draws at most every mininterval
    if step % self.cfg.train.log_every == 0:
      self.log.write(row)
    return row

  def _eval_and_log(self, step: int) -> dict:
    result = self.evaluate()
    if self._recent_losses:
      result["train_loss"] = float(np.mean(self._recent_losses))
      self._recent_losses.clear()
    best = result["val_loss"] < self.best_val
    self.best_val = min(self.best_val, result["val_loss"])
    if self.cfg.train.sample_tokens > 0:  # 0 turns the eval-time sample off
      result["sample"] = self.sample()
    self.log.write({"step": step, "tokens": step * self.tokens_per_step} | result)
    if self.is_main:
      bpb = f", val bpb {result['val_bpb']:.4f}" if "val_bpb" in result else ""
      tqdm.write(f"step {step}: val loss {result['val_loss']:.4f}{bpb}\n"
                 f"  sample: {result.get('sample', '')!r}")
    self._save(result, best=best)
    return result

  def _finish(self, last: dict) -> dict:
    self.checkpoints.wait()
    if self.is_main and self.log.path.exists():
      self.log.plot(self.run_dir / PLOT_FILE, self.step)
    return last

  def close(self) -> None:
    self.checkpoints.wait()
    self.checkpoints.close()
    self.log.close()


def train(cfg: RunConfig, *, progress: bool = True) -> dict:
  """Trains (or resumes) the run that cfg describes; returns the last metrics."""
  trainer = Trainer(cfg, progress=progress)
  try:
    return trainer.run()
  finally:
    trainer.close()
