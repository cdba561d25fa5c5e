"""Distillation measured against training alone: nano students from scratch, distilled online
and distilled from an offline top-k cache, same data, steps, schedule and seeds.

  python -m nanogptoss_jax.experiments.distill_compare --teacher RUN --data DIR --out DIR
      [--runs DIR] [--seeds 0,1,2] [--arms scratch,online,top_k] [--alpha A] [--tau T]
      [--config.KEY=VALUE ...]

--alpha and --tau take one value for every distilled arm or one per arm
(`--alpha online=0.9,top_k=0.5`), so each arm can run with the setting tuned for it.

Every student is a `train.py` child process (its own memory, resumable: a finished run is read,
not retrained); the offline arm first runs the teacher-cache command once (the cache is keyed by
the data and the teacher, so every seed and every (alpha, tau) share it). The report scores the
students' plain cross-entropy on the data's validation split, so distilled and scratch runs are
compared on the same number; the teacher's own score on that split comes from its metrics.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from nanogptoss_jax.experiments.compare_report import mean_std, write_json  # noqa: E402
from nanogptoss_jax.training.plots import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
STUDENT_CONFIG = "configs/nano.py"
ARMS = {"scratch": "nano alone", "online": "nano distilled online",
        "top_k": "nano distilled, offline top-k"}
COLORS = {"scratch": "tab:gray", "online": "tab:blue", "top_k": "tab:orange"}
METRICS_FILE, REPORT_FILE, RESULTS_FILE, PLOT_FILE = (
    "metrics.jsonl", "report.md", "results.json", "val_loss.png")


def per_arm(text: str) -> dict[str, float]:
  """"0.5" -> that value for every distilled arm; "online=0.9,top_k=0.5" -> one per arm."""
  if "=" not in text:
    return {arm: float(text) for arm in ARMS if arm != "scratch"}
  values = dict(item.split("=") for item in text.split(","))
  unknown = set(values) - set(ARMS)
  if unknown:
    sys.exit(f"error: {text!r} names no arm {sorted(unknown)}; the arms are {list(ARMS)}")
  return {arm: float(value) for arm, value in values.items()}


def kd_setting(arm: str, args) -> tuple[float, float]:
  """(alpha, tau) of a distilled arm."""
  try:
    return args.alpha[arm], args.tau[arm]
  except KeyError:
    sys.exit(f"error: --alpha and --tau must give a value for arm {arm!r}")


def arm_overrides(arm: str, args) -> list[str]:
  """The overrides that make `arm` out of the shared student config."""
  if arm == "scratch":
    return []
  alpha, tau = kd_setting(arm, args)
  kd = [f"--config.train.teacher={args.teacher}", f"--config.train.kd_alpha={alpha}",
        f"--config.train.kd_temperature={tau}"]
  if arm == "online":
    return kd + ["--config.train.kd_mode=online"]
  return kd + ["--config.train.kd_mode=top_k", f"--config.train.kd_k={args.k}"]


def run_dir(arm: str, seed: int, args) -> Path:
  if arm == "scratch":
    return Path(args.runs) / f"{arm}-s{seed}"
  alpha, tau = kd_setting(arm, args)
  return Path(args.runs) / f"{arm}-a{alpha:g}-t{tau:g}-s{seed}"


def arm_label(arm: str, args) -> str:
  if arm == "scratch":
    return ARMS[arm]
  alpha, tau = kd_setting(arm, args)
  return f"{ARMS[arm]} (α {alpha:g}, τ {tau:g})"


def finished(path: Path, steps: int) -> bool:
  metrics = path / METRICS_FILE
  return metrics.exists() and any(row.get("step") == steps and "val_loss" in row
                                  for row in read_metrics(metrics))


def _child(argv: list[str]) -> None:
  print("+", " ".join(argv), flush=True)
  code = subprocess.run([sys.executable, *argv], cwd=ROOT).returncode
  if code:  # the child printed its own error line; the runs finished so far stay as they are
    sys.exit(f"error: {argv[0]} {argv[1]} exited with {code} (above); rerunning the same "
             f"command resumes from the finished runs")


def summarize_run(arm: str, seed: int, path: Path, tokens_per_step: int) -> dict:
  """The final eval, the last logged training losses and the median speed of one student."""
  rows = read_metrics(path / METRICS_FILE)
  evals = [row for row in rows if "val_loss" in row]
  train = [row for row in rows if "tokens_per_s" in row]
  speed = float(np.median([row["tokens_per_s"] for row in train[1:] or train]))
  last = train[-1]
  return {"arm": arm, "seed": seed, "run_dir": str(path), "val_loss": evals[-1]["val_loss"],
          "val_bpb": evals[-1].get("val_bpb"), "train_ce": last.get("ce", last["loss"]),
          "tokens_per_s": speed, "s_per_step": tokens_per_step / speed}


def teacher_score(teacher: str) -> dict:
  rows = [row for row in read_metrics(Path(teacher) / METRICS_FILE) if "val_loss" in row]
  return {"val_loss": rows[-1]["val_loss"], "val_bpb": rows[-1].get("val_bpb"),
          "step": rows[-1]["step"], "tokens": rows[-1]["tokens"]}


def _cell(stats: dict, fmt: str) -> str:
  if stats["n"] == 0:
    return "n/a"
  if stats["n"] == 1 or math.isnan(stats["std"]):
    return fmt.format(stats["mean"])
  return f"{fmt.format(stats['mean'])} ± {fmt.replace('+', '').format(stats['std'])}"


def results_table(runs: list[dict], labels: dict[str, str]) -> tuple[str, dict]:
  """Rows: arms; columns: mean ± std of each score, and the val-loss change against scratch
  paired by seed (the seed fixes the data order and the student's initialisation)."""
  scratch = {run["seed"]: run for run in runs if run["arm"] == "scratch"}
  summary = {}
  lines = ["| student | val loss (nats/token) | val bits/byte | train CE, last logged | "
           "val loss vs alone (paired by seed) | s/step (median) |",
           "|---|---:|---:|---:|---:|---:|"]
  for arm, label in labels.items():
    mine = [run for run in runs if run["arm"] == arm]
    stats = {key: mean_std([run[key] for run in mine])
             for key in ("val_loss", "val_bpb", "train_ce", "s_per_step")}
    paired = [100.0 * (run["val_loss"] / scratch[run["seed"]]["val_loss"] - 1.0)
              for run in mine if run["seed"] in scratch]
    stats["vs_scratch_percent"] = mean_std(paired)
    summary[arm] = stats
    versus = "—" if arm == "scratch" else _cell(stats["vs_scratch_percent"], "{:+.2f}") + "%"
    seeds = f"{len(mine)} seed" + "s" * (len(mine) != 1)
    lines.append(f"| {label}, {seeds} | {_cell(stats['val_loss'], '{:.4f}')} | "
                 f"{_cell(stats['val_bpb'], '{:.4f}')} | {_cell(stats['train_ce'], '{:.4f}')} | "
                 f"{versus} | {_cell(stats['s_per_step'], '{:.2f}')} |")
  return "\n".join(lines), summary


def plot(runs: list[dict], labels: dict[str, str], teacher: dict, out_path: Path) -> None:
  """Validation loss against training tokens: thin lines per seed, thick per-arm means."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for arm, label in labels.items():
    curves = []
    for run in (r for r in runs if r["arm"] == arm):
      curve = {row["tokens"]: row["val_loss"]
               for row in read_metrics(Path(run["run_dir"]) / METRICS_FILE) if "val_loss" in row}
      ax.plot(list(curve), list(curve.values()), color=COLORS[arm], lw=0.8, alpha=0.4)
      curves.append(curve)
    shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    ax.plot(shared, [np.mean([c[t] for c in curves]) for t in shared], color=COLORS[arm],
            lw=2.5, marker="o", ms=4, label=f"{label}: mean of {len(curves)} seeds")
  ax.axhline(teacher["val_loss"], color="black", ls="--", lw=1,
             label=f"teacher (small, {teacher['tokens'] / 1e6:.1f}M tokens): "
                   f"{teacher['val_loss']:.3f}")
  ax.set_xlabel("student training tokens")
  ax.set_ylabel("validation loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--teacher", required=True, help="the teacher's run directory")
  parser.add_argument("--data", required=True, help="text dataset (hub id or local directory)")
  parser.add_argument("--out", required=True, help="where report.md, results.json, the plot go")
  parser.add_argument("--runs", default="runs/distill", help="the students' run directories")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--alpha", type=per_arm, default="0.5")
  parser.add_argument("--tau", type=per_arm, default="1.0")
  parser.add_argument("--k", type=int, default=32)
  parser.add_argument("--steps", type=int, default=150)
  args, overrides = parser.parse_known_args(argv)
  seeds = [int(s) for s in args.seeds.split(",")]
  arms = args.arms.split(",")
  args.teacher = str(Path(args.teacher).resolve())
  common = [f"--config.data.path={args.data}", f"--config.train.steps={args.steps}",
            f"--config.train.eval_every={max(args.steps // 5, 1)}",
            f"--config.train.ckpt_every={args.steps}",
            f"--config.optim.warmup_steps={max(args.steps // 10, 1)}", *overrides]
  tokens_per_step = 16 * 256  # nano's batch x context (the overrides here do not change them)
  if "top_k" in arms:  # one cache for every seed: windows are keyed by position, not by order
    _child(["-m", "nanogptoss_jax.commands.teacher_cache", "--config", STUDENT_CONFIG,
            *common, *arm_overrides("top_k", args)])
  runs = []
  for seed in seeds:
    for arm in arms:
      path = run_dir(arm, seed, args)
      if not finished(path, args.steps):
        _child(["train.py", "--config", STUDENT_CONFIG, *common, *arm_overrides(arm, args),
                f"--config.train.seed={seed}", f"--config.run_dir={path}"])
      runs.append(summarize_run(arm, seed, path, tokens_per_step))
  teacher = teacher_score(args.teacher)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  labels = {arm: arm_label(arm, args) for arm in arms}
  table, summary = results_table(runs, labels)
  plot(runs, labels, teacher, out / PLOT_FILE)
  (out / "table.md").write_text(table + "\n")
  write_json(out / RESULTS_FILE, {
      "args": {k: v for k, v in vars(args).items()}, "overrides": common,
      "teacher": teacher, "runs": runs, "summary": summary,
      "load_average": os.getloadavg()})
  print(table)
  print(json.dumps({"teacher": teacher}))


if __name__ == "__main__":
  main()
