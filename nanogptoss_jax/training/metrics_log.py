"""A run's metrics.jsonl (and TensorBoard scalars when tensorboardX is installed)."""

import json
import logging
import pathlib

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
  """Appends dicts to metrics.jsonl (and TensorBoard when tensorboardX is installed)."""

  def __init__(self, run_dir: pathlib.Path, enabled: bool):
    self.path = run_dir / METRICS_FILE
    self.enabled = enabled
    self.writer = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # optional
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
      except ImportError:
        pass

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.writer:
      for key, value in row.items():
        if isinstance(value, (int, float)) and key != "step":
          self.writer.add_scalar(key, value, row["step"])

  def set_aside(self) -> None:
    """Renames an existing metrics file (of an earlier, unresumable attempt) out of the way."""
    if not (self.enabled and self.path.exists()):
      return
    number = 1
    while (target := self.path.with_name(f"{self.path.stem}.previous-{number}.jsonl")).exists():
      number += 1
    self.path.rename(target)
    logging.warning("a new run starts in %s: its old %s was renamed %s", self.path.parent,
                    self.path.name, target.name)

  def truncate_after(self, step: int) -> None:
    """Drops rows past `step` (written after the checkpoint a resume starts from)."""
    if self.enabled and self.path.exists():
      rows = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= step]
      self.path.write_text("".join(line + "\n" for line in rows))
