"""Running a comparison: every (model, seed) run trains in its own child process, so its peak
memory is its own and the parent never claims an accelerator; the parent reads what they wrote."""

import json
import logging
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from nanogptoss_jax import cpu_malloc
from nanogptoss_jax.experiments.compare_config import (MODELS, PROMPT_TEXT, PROMPT_TOKENS,
                                                      SAMPLE_REPEATS, SAMPLE_TOP_K,
                                                      CompareConfig, run_configs)
from nanogptoss_jax.experiments.compare_report import (hardware, read_rows, write_json,
                                                      write_report)
from nanogptoss_jax.experiments.timing import best_time
from nanogptoss_jax.data.streams import prepare_data
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.registry import abstract_model
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.training.checkpoints import BEST_DIR
from nanogptoss_jax.training.config_io import config_from_dict, config_to_dict
from nanogptoss_jax.training.loop import Trainer
from nanogptoss_jax.training.run_config import RunConfig

MIB = 2**20
RUN_REQUEST_FILE, RUN_RESULT_FILE = "compare_request.json", "compare_result.json"
# The child runs this; argv: request path, result path, "1" to show progress bars.
WORKER_CODE = ("import sys; from nanogptoss_jax.experiments.compare_runs import run_worker; "
               "run_worker(sys.argv[1:])")


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
  counts = abstract_model(cfg.model).param_counts()
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


def run_worker(argv: list[str]) -> None:
  """The child's entry point: request JSON in, measurements JSON out."""
  request_path, result_path, progress = argv
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file at INFO
  request = json.loads(Path(request_path).read_text())
  cfg = config_from_dict(request["config"])
  measured = measure_run(cfg, request["sample_tokens"], progress=progress == "1")
  write_json(Path(result_path), {"request": request, "measured": measured})


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
  write_json(request_path, request)
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
  write_json(result_path, result)
  return result["measured"]


def metrics_summary(run_dir: str | os.PathLike) -> dict:
  """Final step, tokens and losses, and median training tokens/s, from a run's metrics.jsonl."""
  rows = read_rows(Path(run_dir))
  final = [row for row in rows if "val_loss" in row][-1]
  speeds = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
  # The first logged speed may hold warm-up; drop it when there are others.
  speeds = speeds[1:] or speeds
  return {"step": final["step"], "tokens": final["tokens"], "val_loss": final["val_loss"],
          "val_bpb": final["val_bpb"], "train_loss": final.get("train_loss", math.nan),
          "train_tokens_per_s": float(np.median(speeds)) if speeds else math.nan}


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
