"""GPT-OSS against its GPT-2 twin over several seeds: train both, measure, write a report.

Every (model, seed) run trains in its own child process, so its peak memory is its own and the
parent never claims an accelerator. The parent only orchestrates, then reads what the children
wrote: each run directory's metrics.jsonl and the child's measurements (compare_result.json).
"""

import dataclasses
import json
import logging
import math
import os
import platform
import resource
import runpy
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from nanogptoss_jax import cpu_malloc
from nanogptoss_jax.checkpoint import BEST_DIR
from nanogptoss_jax.config import ConfigError
from nanogptoss_jax.config_cli import (apply_overrides, config_from_dict, config_to_dict,
                                       load_config_file, validate_run_config)
from nanogptoss_jax.data import prepare_data
from nanogptoss_jax.models import abstract_model
from nanogptoss_jax.params import param_counts
from nanogptoss_jax.plots import read_metrics
from nanogptoss_jax.run_config import RunConfig, gpt2_twin
from nanogptoss_jax.sampling import generate
from nanogptoss_jax.timing import best_time
from nanogptoss_jax.trainer import METRICS_FILE, Trainer

# Model keys (folder prefixes) and their names in the report, GPT-OSS first.
MODELS = {"gpt_oss": "GPT-OSS", "gpt2": "GPT-2"}
# The comparison itself sets these per run; a user override of them would break the pairing.
MANAGED_KEYS = ("run_dir", "train.seed")
# Sampling speed: batch 1, a fixed 16-token prompt, top-k 50 (the seed's sampler), best of 3.
PROMPT_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
               "in the sun with her big red ball.")
PROMPT_TOKENS = 16
SAMPLE_TOP_K = 50
SAMPLE_REPEATS = 3
MIB = 2**20
MAX_MARKED_POINTS = 30  # a mean curve with at most this many points (evals) marks each one
RUN_REQUEST_FILE, RUN_RESULT_FILE = "compare_request.json", "compare_result.json"
REPORT_FILE, RESULTS_FILE = "report.md", "results.json"
VAL_PLOT_FILE, TRAIN_PLOT_FILE = "val_loss.png", "train_loss.png"
# The child runs this; argv: request path, result path, "1" to show progress bars.
WORKER_CODE = "import sys; from nanogptoss_jax.compare import run_worker; run_worker(sys.argv[1:])"


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """Which GPT-OSS run to compare with its GPT-2 twin, over which seeds, and where to write."""

  base: str  # path of the GPT-OSS run config (configs/<name>.py)
  seeds: tuple[int, ...] = (0, 1, 2)
  out_dir: str = "runs/compare_nano"
  overrides: tuple[str, ...] = ()  # KEY=VALUE for the base run, so for both twins
  sample_tokens: int = 128  # new tokens per timed sampling call

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ConfigError(f"seeds must be distinct and non-empty (got {self.seeds!r})")
    if self.sample_tokens <= 0:
      raise ConfigError(f"sample_tokens must be > 0 (got {self.sample_tokens!r})")
    if not self.out_dir.strip():
      raise ConfigError("out_dir must not be empty")


# --------------------------------------------------------------------------- configs


def load_compare_config(path: str | os.PathLike) -> CompareConfig:
  """The CompareConfig that `get_config()` in the Python file at `path` returns."""
  if not Path(path).is_file():
    raise FileNotFoundError(f"compare config {str(path)!r} does not exist")
  cfg = runpy.run_path(str(path))["get_config"]()
  if not isinstance(cfg, CompareConfig):
    raise ConfigError(f"get_config() in {str(path)!r} returned {type(cfg).__name__}, "
                      "expected CompareConfig")
  return cfg


def _parse_field(name: str, text: str) -> Any:
  """`text` typed as CompareConfig field `name`; tuples are comma-separated."""
  hints = typing.get_type_hints(CompareConfig)
  if name not in hints:
    raise ConfigError(f"unknown key {name!r}; valid keys: {', '.join(sorted(hints))}")
  kind = hints[name]
  try:
    if typing.get_origin(kind) is tuple:
      item_type = typing.get_args(kind)[0]
      return tuple(item_type(item.strip()) for item in text.split(",") if item.strip())
    return kind(text)
  except ValueError:
    raise ConfigError(f"bad value for {name!r}: expected {kind}, got {text!r}") from None


def parse_args(argv: list[str]) -> tuple[CompareConfig, list[str]]:
  """(CompareConfig, run overrides) from `--config PATH`, `--config.KEY=V` and `--run.KEY=V`."""
  path, changes, run_overrides = None, {}, []
  args = list(argv)
  while args:
    flag, sep, value = args.pop(0).partition("=")
    if not sep:
      if not args:
        raise ConfigError(f"{flag} needs a value")
      value = args.pop(0)
    if flag == "--config":
      path = value
    elif flag.startswith("--config."):
      key = flag.removeprefix("--config.")
      changes[key] = _parse_field(key, value)
    elif flag.startswith("--run."):
      run_overrides.append(f"{flag.removeprefix('--run.')}={value}")
    else:
      raise ConfigError(f"unrecognised argument {flag!r}; use --config PATH, --config.KEY=VALUE "
                        "(comparison) or --run.KEY=VALUE (both run configs)")
  if path is None:
    raise ConfigError("missing --config PATH (e.g. --config configs/compare_nano.py)")
  return dataclasses.replace(load_compare_config(path), **changes), run_overrides


def run_configs(cmp: CompareConfig,
                run_overrides: list[str] = ()) -> list[tuple[str, int, RunConfig]]:
  """(model key, seed, run config) for every run, seed-major so machine drift hits both models."""
  overrides = [*cmp.overrides, *run_overrides]
  managed = [item for item in overrides if item.partition("=")[0].strip() in MANAGED_KEYS]
  if managed:
    raise ConfigError(f"{managed} cannot be overridden: the comparison sets "
                      f"{' and '.join(MANAGED_KEYS)} per run "
                      "(use --config.seeds and --config.out_dir)")
  # Overrides go to the GPT-OSS run before its twin is derived, so both twins get them.
  base = apply_overrides(load_config_file(cmp.base), list(overrides))
  runs = []
  for seed in cmp.seeds:
    seeded = apply_overrides(base, {"train.seed": seed})
    for model, cfg in (("gpt_oss", seeded), ("gpt2", gpt2_twin(seeded))):
      cfg = dataclasses.replace(cfg, run_dir=str(Path(cmp.out_dir) / f"{model}_seed{seed}"))
      validate_run_config(cfg)
      runs.append((model, seed, cfg))
  # GPT-2 learns one embedding per position, up to the training window only.
  context_len = base.train.context_len
  if PROMPT_TOKENS + cmp.sample_tokens > context_len:
    raise ConfigError(f"sample_tokens={cmp.sample_tokens} plus the {PROMPT_TOKENS}-token prompt "
                      f"exceeds train.context_len={context_len}, GPT-2's last position")
  return runs


# --------------------------------------------------------------------------- one run (child)


def _dir_bytes(path: Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_bytes(run_dir: str | os.PathLike) -> int:
  """Bytes on disk of the newest step of the run's best/ checkpoints (params + AdamW state)."""
  steps = [p for p in (Path(run_dir) / BEST_DIR).iterdir() if p.is_dir() and p.name.isdigit()]
  return _dir_bytes(max(steps, key=lambda p: int(p.name)))


def _peak_rss_bytes() -> int:
  """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024


def sampling_tokens_per_s(model, tokenizer, new_tokens: int) -> float:
  """New tokens/s of `generate` (batch 1, fixed prompt, no stop tokens), best of a few."""
  prompt = tokenizer.encode(PROMPT_TEXT)[:PROMPT_TOKENS]
  assert len(prompt) == PROMPT_TOKENS, "PROMPT_TEXT is too short for PROMPT_TOKENS"
  # stop_tokens=() so every call draws exactly new_tokens; the first call compiles.
  sample = lambda: generate(model, [prompt], new_tokens, temperature=1.0,
                            top_k=min(SAMPLE_TOP_K, model.cfg.vocab_size), seed=0, stop_tokens=())
  return new_tokens / best_time(sample, SAMPLE_REPEATS)


def _device_peak_bytes() -> int | None:
  """Peak accelerator memory in use, where the backend reports it (GPUs; not the CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def measure_run(cfg: RunConfig, sample_tokens: int, *, progress: bool = False) -> dict:
  """Trains (or resumes) one run in this process and measures memory, disk and sampling."""
  # Speeds on a shared machine mean little without its load: the 5-minute average, before/after.
  load_before = os.getloadavg()[1]
  trainer = Trainer(cfg, progress=progress)
  start_step = trainer.step
  try:
    trainer.run()
  finally:
    trainer.close()
  if trainer.step < cfg.train.steps:  # stopped by a signal; it saved, so a rerun resumes
    raise SystemExit(f"{cfg.run_dir} stopped at step {trainer.step} of {cfg.train.steps}")
  # Read before sampling, so these peaks are training's (with its evals and checkpoints).
  peak_rss, device_peak, load_after = _peak_rss_bytes(), _device_peak_bytes(), os.getloadavg()[1]
  # The trained model in memory: the same shapes, so the same speed, as its checkpoint.
  sample_speed = sampling_tokens_per_s(trainer.model(), trainer.tokenizer, sample_tokens)
  counts = param_counts(abstract_model(cfg.model))
  device = jax.devices()[0]
  return {
      "params_total": counts["total"], "params_active": counts["active"],
      "peak_rss_mib": peak_rss / MIB,
      "device_peak_mib": None if device_peak is None else device_peak / MIB,
      "checkpoint_mib": checkpoint_bytes(cfg.run_dir) / MIB,
      "sample_tokens_per_s": sample_speed,
      # A resumed run's peak memory covers only the part trained in this process.
      "resumed_from_step": start_step, "load_5min_before": load_before,
      "load_5min_after": load_after,
      "backend": jax.default_backend(), "device_count": jax.device_count(),
      "device_kind": device.device_kind,
  }


def _write_json(path: Path, value: Any) -> None:
  """Writes JSON atomically: a crash leaves the old file or none, never half of one."""
  temporary = path.with_suffix(".tmp")
  temporary.write_text(json.dumps(value, indent=2) + "\n")
  temporary.replace(path)


def run_worker(argv: list[str]) -> None:
  """The child's entry point: request JSON in, measurements JSON out."""
  request_path, result_path, progress = argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
  request = json.loads(Path(request_path).read_text())
  cfg = config_from_dict(request["config"])
  measured = measure_run(cfg, request["sample_tokens"], progress=progress == "1")
  _write_json(Path(result_path), {"request": request, "measured": measured})


# --------------------------------------------------------------------------- runs (parent)


def _child_env() -> dict[str, str]:
  """This environment, plus the package on PYTHONPATH and the CPU malloc fix."""
  env = dict(os.environ)
  package_root = str(Path(__file__).resolve().parents[1])
  env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
  if sys.platform == "linux" and not env.get(cpu_malloc.OPT_OUT):
    env.setdefault("GLIBC_TUNABLES", cpu_malloc.TUNABLES)  # read only at process start
  return env


def train_and_measure(cfg: RunConfig, sample_tokens: int, *, progress: bool = True) -> dict:
  """One run's measurements: reused when this exact run was measured before, else a child's."""
  run_dir = Path(cfg.run_dir)
  # Through JSON, so a saved request (lists, not tuples) compares equal to a fresh one.
  request = json.loads(json.dumps({"config": config_to_dict(cfg), "sample_tokens": sample_tokens}))
  request_path, result_path = run_dir / RUN_REQUEST_FILE, run_dir / RUN_RESULT_FILE
  # Resuming a run under other settings (steps, schedule, ...) would measure a hybrid of two.
  if request_path.exists() and json.loads(request_path.read_text()) != request:
    raise ConfigError(f"{run_dir} holds a run with other settings (see {request_path}); use "
                      "another --config.out_dir, or move that folder away")
  if result_path.exists():
    logging.info("%s: already trained and measured; skipping", run_dir)
    return json.loads(result_path.read_text())["measured"]
  run_dir.mkdir(parents=True, exist_ok=True)
  _write_json(request_path, request)
  start = time.perf_counter()
  child = subprocess.Popen([sys.executable, "-c", WORKER_CODE, str(request_path),
                            str(result_path), "1" if progress else "0"], env=_child_env())
  try:
    returncode = child.wait()
  except KeyboardInterrupt:
    child.wait()  # the child got the same Ctrl-C: let it save its checkpoint first
    raise
  if returncode != 0:
    raise RuntimeError(f"the run in {run_dir} failed (exit code {returncode}; its output is "
                       "above); rerun the same command to resume it")
  result = json.loads(result_path.read_text())
  # The child's whole life (startup, compiles, evals, sampling): what the run cost in time.
  result["measured"]["wall_s"] = time.perf_counter() - start
  _write_json(result_path, result)
  return result["measured"]


def _read_rows(run_dir: Path) -> list[dict]:
  return read_metrics(run_dir / METRICS_FILE)


def metrics_summary(run_dir: str | os.PathLike) -> dict:
  """Final step, tokens and losses, and median training tokens/s, from a run's metrics.jsonl."""
  rows = _read_rows(Path(run_dir))
  final = [row for row in rows if "val_loss" in row][-1]
  speeds = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
  # The first logged speed may hold warm-up; drop it when there are others.
  speeds = speeds[1:] or speeds
  return {"step": final["step"], "tokens": final["tokens"], "val_loss": final["val_loss"],
          "val_bpb": final["val_bpb"], "train_loss": final.get("train_loss", math.nan),
          "train_tokens_per_s": float(np.median(speeds)) if speeds else math.nan}


# --------------------------------------------------------------------------- report


# (result key, row label, number format); rows of the report's table, in order.
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
  if fields.get("intermediate_size") is None and hasattr(cfg, "mlp_size"):
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
      curve = {row["tokens"]: row[row_key] for row in _read_rows(Path(run["run_dir"]))
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
  _write_json(out / RESULTS_FILE, {
      "compare_config": dataclasses.asdict(cmp), "run_overrides": list(run_overrides),
      "hardware": hw, "runs": runs, "summary": summary})
  return summary


def compare(cmp: CompareConfig, run_overrides: list[str] = (), *, progress: bool = True) -> dict:
  """Trains and measures every run (skipping finished ones), then writes the report."""
  configs = run_configs(cmp, list(run_overrides))
  Path(cmp.out_dir).mkdir(parents=True, exist_ok=True)
  # Tokenise once here (every run shares the data config), so no run's peak memory includes it.
  prepare_data(configs[0][2].data)
  runs = []
  for model, seed, cfg in configs:
    logging.info("run %d/%d: %s seed %d in %s", len(runs) + 1, len(configs), MODELS[model], seed,
                 cfg.run_dir)
    measured = train_and_measure(cfg, cmp.sample_tokens, progress=progress)
    runs.append({"model": model, "seed": seed, "run_dir": cfg.run_dir,
                 **metrics_summary(cfg.run_dir), **measured})
  return write_report(cmp, list(run_overrides), configs, runs, hardware(runs))
