"""The comparison's report: mean ± std per model over seeds, paired differences, tables, plots."""

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from nanogptoss_jax.experiments.compare_config import (MODELS, PROMPT_TOKENS, SAMPLE_REPEATS,
                                                      SAMPLE_TOP_K, CompareConfig)
from nanogptoss_jax.training.config_io import config_to_dict
from nanogptoss_jax.training.metrics_log import METRICS_FILE
from nanogptoss_jax.training.plots import read_metrics

MAX_MARKED_POINTS = 30  # a mean curve with at most this many points (evals) marks each one
REPORT_FILE, RESULTS_FILE = "report.md", "results.json"
VAL_PLOT_FILE, TRAIN_PLOT_FILE = "val_loss.png", "train_loss.png"


METRICS = [
    ("params_total", "parameters, total", "{:,.0f}"),
    ("params_active", "parameters, active per token", "{:,.0f}"),
    ("train_loss", "train loss (nats/token, mean over the last eval interval)", "{:.4f}"),
    ("val_loss", "val loss (nats/token)", "{:.4f}"),
    ("val_bpb", "val bits per byte", "{:.4f}"),
    ("peak_rss_mib", "peak memory, training process RSS (MiB)", "{:,.0f}"),
    ("device_peak_mib", "peak accelerator memory, training (MiB)", "{:,.0f}"),
    ("checkpoint_mib", "checkpoint on disk, one best/ step (MiB)", "{:,.1f}"),
    ("train_tokens_per_s", "training tokens/s (median of logs)", "{:,.0f}"),
    ("sample_tokens_per_s", "sampling tokens/s (batch 1)", "{:,.1f}"),
]


def read_rows(run_dir: Path) -> list[dict]:
  return read_metrics(run_dir / METRICS_FILE)


def write_json(path: Path, value: Any) -> None:
  """Writes JSON atomically: a crash leaves the old file or none, never half of one."""
  temporary = path.with_suffix(".tmp")
  temporary.write_text(json.dumps(value, indent=2) + "\n")
  temporary.replace(path)


def _is_number(value) -> bool:
  """A finite number; None (not measured, e.g. device memory on a CPU) and NaN are not."""
  return value is not None and math.isfinite(value)


def mean_std(values: list[float]) -> dict:
  """{"mean", "std" (sample std, ddof 1; NaN for one value), "n"} of the finite values."""
  values = [float(v) for v in values if _is_number(v)]
  n = len(values)
  return {"mean": float(np.mean(values)) if n else math.nan,
          "std": float(np.std(values, ddof=1)) if n > 1 else math.nan, "n": n}


def summarize(runs: list[dict]) -> dict:
  """Per model: mean ± std of every metric; and GPT-OSS vs GPT-2 relative differences (%).

  Relative differences pair the two models' runs of the same seed (same data order), then
  average over seeds.
  """
  by_model = {model: {run["seed"]: run for run in runs if run["model"] == model}
              for model in MODELS}
  summary = {model: {key: mean_std([run.get(key) for run in seeds.values()])
                     for key, _, _ in METRICS} for model, seeds in by_model.items()}
  oss, gpt2 = by_model["gpt_oss"], by_model["gpt2"]
  relative = {}
  for key, _, _ in METRICS:
    pairs = [(oss[s].get(key), gpt2[s].get(key)) for s in sorted(set(oss) & set(gpt2))]
    relative[key] = mean_std([100.0 * (a / b - 1.0) for a, b in pairs
                              if _is_number(a) and _is_number(b) and b != 0])
  return {"models": summary, "relative_percent": relative}


def _cell(stats: dict, fmt: str, unit: str = "") -> str:
  """"mean ± std" (the std unsigned), or just the mean for one seed or a constant."""
  if stats["n"] == 0:
    return "n/a"
  mean = fmt.format(stats["mean"]) + unit
  if math.isnan(stats["std"]) or stats["std"] == 0:  # one seed, or e.g. parameter counts
    return mean
  return f"{mean} ± {fmt.replace('+', '').format(stats['std'])}{unit}"


def results_table(summary: dict) -> str:
  """The markdown table: a row per metric, a column per model, then the relative difference."""
  lines = [f"| metric | {' | '.join(MODELS.values())} | GPT-OSS vs GPT-2 |",
           "|---|" + "---:|" * (len(MODELS) + 1)]
  for key, label, fmt in METRICS:
    cells = [summary["models"][model][key] for model in MODELS]
    if all(stats["n"] == 0 for stats in cells):
      continue  # e.g. accelerator memory on a CPU
    relative = _cell(summary["relative_percent"][key], "{:+.1f}", "%")
    lines.append(f"| {label} | {' | '.join(_cell(c, fmt) for c in cells)} | {relative} |")
  return "\n".join(lines)


def _plural(count: int, noun: str) -> str:
  return f"{count} {noun}" + ("" if count == 1 else "s")


def headline(summary: dict) -> str:
  """The one-line answer: the val-loss difference with its spread over seeds."""
  stats = summary["relative_percent"]["val_loss"]
  spread = "n/a with one seed" if math.isnan(stats["std"]) else f"{stats['std']:.1f}"
  return (f"GPT-OSS vs GPT-2 val loss: {stats['mean']:+.1f}% (± {spread}; mean and sample std "
          f"of the per-seed differences, {_plural(stats['n'], 'seed')})")


def hardware(runs: list[dict]) -> dict:
  """What the runs ran on, as the children saw it, and this machine's CPUs."""
  first = runs[0]
  return {"backend": first["backend"], "device_count": first["device_count"],
          "device_kind": first["device_kind"], "cpu_count": os.cpu_count(),
          "machine": platform.machine(), "python": platform.python_version()}


def _hardware_line(hw: dict) -> str:
  return (f"jax backend `{hw['backend']}`, {hw['device_count']} device(s) ({hw['device_kind']}), "
          f"{hw['cpu_count']} CPUs ({hw['machine']}), Python {hw['python']}; each run's machine "
          "load is in the table of runs")


def _model_line(cfg) -> str:
  fields = dataclasses.asdict(cfg)
  if fields.get("intermediate_size") is None:
    fields["intermediate_size"] = cfg.mlp_size  # GPT-2's None means 4 * hidden_size
  shown = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
           "num_key_value_heads", "head_dim", "num_experts", "experts_per_token",
           "sliding_window", "vocab_size", "max_position_embeddings")
  return ", ".join(f"{name}={fields[name]}" for name in shown if name in fields)


def setup_section(cmp: CompareConfig, run_overrides: list[str], configs: list, hw: dict) -> str:
  """What was compared, how, and on what: enough to reproduce the table."""
  first = {model: cfg for model, seed, cfg in configs if seed == cmp.seeds[0]}
  run = first["gpt_oss"]
  train, optim = run.train, run.optim
  tokens = train.steps * train.batch_size * train.context_len
  full = {model: config_to_dict(cfg) for model, cfg in first.items()}
  return "\n".join([
      "## Setup",
      f"- base run config: `{cmp.base}`; overrides for both twins: "
      f"`{' '.join([*cmp.overrides, *run_overrides]) or 'none'}`",
      f"- seeds: {', '.join(map(str, cmp.seeds))}; a seed fixes the data order (the same for "
      "both models) and the initialisation",
      f"- budget per run: {train.steps} steps × {train.batch_size} sequences × "
      f"{train.context_len} tokens = {tokens:,} training tokens; AdamW lr {optim.lr:g}, "
      f"{optim.warmup_steps} warmup steps, cosine to {optim.min_lr:g}, weight decay "
      f"{optim.weight_decay:g}; eval every {train.eval_every} steps on {run.data.val_windows} "
      f"validation windows",
      f"- data: `{run.data.path}` (compact vocabulary: {run.data.compact_vocab_size or 'off'})",
      f"- GPT-OSS: {_model_line(run.model)}",
      f"- GPT-2: {_model_line(first['gpt2'].model)}",
      f"- sampling: batch 1, a {PROMPT_TOKENS}-token prompt, {cmp.sample_tokens} new tokens, "
      f"temperature 1, top-k {SAMPLE_TOP_K}, no stop tokens, best of {SAMPLE_REPEATS} after a "
      "warm-up call, with the final trained weights",
      f"- hardware: {_hardware_line(hw)}",
      "",
      f"<details><summary>Full run configs (seed {cmp.seeds[0]}; other seeds differ only in "
      "train.seed and run_dir)</summary>",
      "",
      "```json",
      json.dumps(full, indent=2),
      "```",
      "</details>",
  ])


# (result key, column header, number format) of the table of runs.
RUN_COLUMNS = [
    ("val_loss", "val loss", "{:.4f}"), ("val_bpb", "val bpb", "{:.4f}"),
    ("train_loss", "train loss", "{:.4f}"), ("train_tokens_per_s", "train tokens/s", "{:,.0f}"),
    ("sample_tokens_per_s", "sample tokens/s", "{:,.1f}"),
    ("peak_rss_mib", "peak RSS MiB", "{:,.0f}"),
    ("wall_s", "wall s", "{:,.0f}"), ("load_5min_before", "load before", "{:.2f}"),
    ("load_5min_after", "load after", "{:.2f}"),
]


def per_run_table(runs: list[dict]) -> str:
  """Every run's own numbers and machine load (5-minute average), to show the spread."""
  lines = ["| run | " + " | ".join(header for _, header, _ in RUN_COLUMNS) + " |",
           "|---|" + "---:|" * len(RUN_COLUMNS)]
  for run in runs:
    cells = [fmt.format(run[key]) if _is_number(run.get(key)) else "n/a"
             for key, _, fmt in RUN_COLUMNS]
    lines.append(f"| {MODELS[run['model']]} seed {run['seed']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_curves(runs: list[dict], row_key: str, out_path: Path, ylabel: str) -> None:
  """`row_key` against tokens: a thin line per run, a thick line for each model's mean."""
  fig, ax = plt.subplots(figsize=(8, 5))
  for color, model in zip(("tab:blue", "tab:orange"), MODELS):
    curves = []
    for run in (r for r in runs if r["model"] == model):
      curve = {row["tokens"]: row[row_key] for row in read_rows(Path(run["run_dir"]))
               if row_key in row}
      ax.plot(list(curve), list(curve.values()), color=color, lw=0.8, alpha=0.45)
      curves.append(curve)
    # The mean only where every run has a point (they share the eval schedule).
    shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    ax.plot(shared, [np.mean([c[t] for c in curves]) for t in shared], color=color, lw=2.5,
            marker="o" if len(shared) <= MAX_MARKED_POINTS else None, ms=4,
            label=f"{MODELS[model]}: mean of {len(curves)} seeds (thin: each seed)")
  ax.set_xlabel("training tokens")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out_path, dpi=120)
  plt.close(fig)


def write_report(cmp: CompareConfig, run_overrides: list[str], configs: list, runs: list[dict],
                 hw: dict) -> dict:
  """report.md, results.json and the plots in out_dir; returns the summary."""
  out = Path(cmp.out_dir)
  summary = summarize(runs)
  plot_curves(runs, "val_loss", out / VAL_PLOT_FILE, "validation loss (nats / token)")
  plot_curves(runs, "loss", out / TRAIN_PLOT_FILE, "training loss (nats / token)")
  report = "\n\n".join([
      f"# GPT-OSS vs GPT-2, {_plural(len(cmp.seeds), 'seed')} each",
      f"**{headline(summary)}**",
      "Mean ± sample standard deviation over seeds. The last column is GPT-OSS's relative "
      "difference from GPT-2, paired by seed (negative: GPT-OSS lower).",
      results_table(summary),
      f"![validation loss]({VAL_PLOT_FILE})\n\n![training loss]({TRAIN_PLOT_FILE})",
      "## Every run",
      per_run_table(runs),
      setup_section(cmp, run_overrides, configs, hw),
  ]) + "\n"
  (out / REPORT_FILE).write_text(report)
  write_json(out / RESULTS_FILE, {
      "compare_config": dataclasses.asdict(cmp), "run_overrides": list(run_overrides),
      "hardware": hw, "runs": runs, "summary": summary})
  return summary
