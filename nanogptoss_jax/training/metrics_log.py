"""A run's metrics.jsonl, with TensorBoard scalars when tensorboardX is installed and a Weights &
Biases run when train.wandb_project names a project."""

import json
import logging
import pathlib

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.training.config_io import config_to_dict
from nanogptoss_jax.training.plots import plot_run
from nanogptoss_jax.training.run_config import RunConfig

METRICS_FILE = "metrics.jsonl"
# The wandb run's id, kept in the run directory so that a resume continues that run.
WANDB_RUN_FILE = "wandb_run_id"
WANDB_PLOT_KEY = "loss_plot"
class MetricsLog:
  """Appends dicts to metrics.jsonl, and to TensorBoard and wandb when they are on."""

  def __init__(self, run_dir: pathlib.Path, enabled: bool, run: RunConfig | None = None):
    self.path = run_dir / METRICS_FILE
    self.enabled = enabled
    self.writer = None
    self.run = run if enabled and run is not None and run.train.wandb_project else None
    self._wandb_run = None  # started at the first row, once the run knows whether it resumes
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # optional
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
      except ImportError:
        pass
    if self.run is not None:
      _import_wandb(self.run)  # a missing package is a mistake to report before training

  @property
  def wandb_run(self):
    if self.run is not None and self._wandb_run is None:
      self._wandb_run = _start_wandb(self.path.parent, self.run)
    return self._wandb_run

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.writer:
      for key, value in row.items():
        if isinstance(value, (int, float)) and key != "step":
          self.writer.add_scalar(key, value, row["step"])
    # wandb keeps one row per step and drops steps below the last one it holds (a resumed
    # online run replays steps after its checkpoint: the same values, already there).
    if self.run is not None and row["step"] >= self.wandb_run.starting_step:
      self.wandb_run.log(row, step=row["step"])

  def plot(self, path: pathlib.Path, step: int) -> None:
    """Draws the loss plot of the rows so far to `path` (a PNG), and sends it to wandb."""
    plot_run(self.path, path)
    if self.run is not None and step >= self.wandb_run.starting_step:
      wandb = _import_wandb(self.run)
      self.wandb_run.log({WANDB_PLOT_KEY: wandb.Image(str(path))}, step=step)

  def close(self) -> None:
    if self._wandb_run is not None:
      self._wandb_run.finish()
      self._wandb_run = None

  def set_aside(self) -> None:
    """Renames an existing metrics file (of an earlier, unresumable attempt) out of the way."""
    if not (self.enabled and self.path.exists()):
      return
    number = 1
    while (target := self.path.with_name(f"{self.path.stem}.previous-{number}.jsonl")).exists():
      number += 1
    self.path.rename(target)
    id_file = self.path.with_name(WANDB_RUN_FILE)
    if id_file.exists():  # that attempt's wandb run, too: this run starts a new one
      id_file.rename(id_file.with_name(f"{WANDB_RUN_FILE}.previous-{number}"))
    logging.warning("a new run starts in %s: its old %s was renamed %s", self.path.parent,
                    self.path.name, target.name)

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step` (written after the checkpoint a resume starts from)."""
    if self.enabled and self.path.exists():
      rows = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= step]
      self.path.write_text("".join(line + "\n" for line in rows))


def _import_wandb(run: RunConfig):
  try:
    import wandb
  except ImportError:
    raise UserError(f"train.wandb_project={run.train.wandb_project!r} needs the wandb package: "
                    f"pip install 'nanogptoss-jax[wandb]', or leave train.wandb_project empty"
                    ) from None
  return wandb


def _start_wandb(run_dir: pathlib.Path, run: RunConfig):
  """A wandb run in `run_dir`/wandb: the one this directory started before, else a new one."""
  wandb = _import_wandb(run)
  id_file = run_dir / WANDB_RUN_FILE
  run_id = id_file.read_text().strip() if id_file.is_file() else None
  started = wandb.init(project=run.train.wandb_project, id=run_id, resume="allow",
                       name=run_dir.resolve().name, dir=str(run_dir), config=config_to_dict(run))
  id_file.write_text(started.id + "\n")
  return started
