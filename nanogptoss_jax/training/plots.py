"""Loss-curve PNGs from a run's metrics.jsonl."""

import json
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_run(metrics_path: str | pathlib.Path, out_path: str | pathlib.Path, title: str = "") -> None:
  """Train loss (every logged step) and validation loss (every eval) against tokens seen."""
  rows = read_metrics(metrics_path)
  train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
  val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if train:
    ax.plot(*zip(*train), label="train loss", alpha=0.7)
  if val:
    ax.plot(*zip(*val), "o-", label="validation loss")
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title or str(pathlib.Path(metrics_path).parent.name))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)
