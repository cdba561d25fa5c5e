"""The GPT-OSS vs GPT-2 comparison: arguments, and a tiny end-to-end run with its report."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from nanogptoss_jax.experiments.compare_config import (MODELS, CompareConfig, parse_args,
                                                      run_configs)
from nanogptoss_jax.experiments.compare_report import (REPORT_FILE, RESULTS_FILE, TRAIN_PLOT_FILE,
                                                      VAL_PLOT_FILE)
from nanogptoss_jax.experiments.compare_runs import RUN_RESULT_FILE, compare
from nanogptoss_jax.errors import UsageError
from nanogptoss_jax.model.config import ConfigError, Gpt2Config, GptOssConfig

REPO = Path(__file__).resolve().parents[1]
TINY_STEPS, TINY_EVAL_EVERY = 6, 3
PNG_MAGIC = b"\x89PNG"
COMPILE_CACHE_ENV = {"JAX_COMPILATION_CACHE_DIR": "{tmp}/jax-cache",
                     "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                     "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
# A base run config file: the tiny training-test run, its token cache in the test's folder.
BASE_CONFIG = """
from tests.train_helpers import tiny_run

def get_config():
  return tiny_run("unused", {cache_dir!r}, steps={steps}, eval_every={eval_every}, ckpt_every=3)
"""


def tiny_compare(tmp_path: Path, **changes) -> CompareConfig:
  """A 2-seed comparison of the tiny run: a few seconds of training per run."""
  base = tmp_path / "tiny_base.py"
  base.write_text(BASE_CONFIG.format(cache_dir=str(tmp_path / "cache"), steps=TINY_STEPS,
                                     eval_every=TINY_EVAL_EVERY))
  fields = dict(base=str(base), seeds=(0, 1), out_dir=str(tmp_path / "cmp"), sample_tokens=8)
  return CompareConfig(**(fields | changes))


def metric_rows(run_dir: str) -> list[dict]:
  lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines if line.strip()]


def test_arguments_set_the_comparison_and_both_runs():
  cmp, run_overrides = parse_args([
      "--config", str(REPO / "configs" / "compare_nano.py"), "--config.seeds=3,4",
      "--config.out_dir", "/tmp/somewhere", "--run.train.steps=7", "--run.optim.lr=0.002"])
  assert cmp.seeds == (3, 4) and cmp.out_dir == "/tmp/somewhere"
  runs = run_configs(cmp, run_overrides)
  assert [(model, seed) for model, seed, _ in runs] == [
      ("gpt_oss", 3), ("gpt2", 3), ("gpt_oss", 4), ("gpt2", 4)]
  for model, seed, cfg in runs:
    assert isinstance(cfg.model, GptOssConfig if model == "gpt_oss" else Gpt2Config)
    assert cfg.train.seed == seed and cfg.train.steps == 7 and cfg.optim.lr == 0.002
    assert cfg.run_dir == f"/tmp/somewhere/{model}_seed{seed}"
  # Twins share everything but the model and the folder.
  assert runs[0][2].data == runs[1][2].data and runs[0][2].train == runs[1][2].train


@pytest.mark.parametrize("argv, message", [
    (["--config.seeds=0"], "missing --config"),
    (["--config", "configs/compare_nano.py", "--config.nope=1"], "unknown key 'nope'"),
    (["--config", "configs/compare_nano.py", "--config.sample_tokens=x"], "sample_tokens"),
    (["--config", "configs/compare_nano.py", "--steps=3"], "unrecognised argument"),
])
def test_bad_arguments_are_refused(argv, message, monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(UsageError, match=message):
    parse_args(argv)


def test_runs_the_comparison_owns_cannot_be_overridden(tmp_path):
  with pytest.raises(ConfigError, match="train.seed"):
    run_configs(tiny_compare(tmp_path), ["train.seed=5"])
  # GPT-2 has no position past the training window (32 tokens here).
  with pytest.raises(ConfigError, match="sample_tokens"):
    run_configs(tiny_compare(tmp_path, sample_tokens=20))


def test_comparison_end_to_end(tmp_path, monkeypatch):
  # The runs (child processes) share compiled steps through JAX's persistent cache: only the
  # first seed compiles. Read from the environment, so the comparison itself is unchanged.
  for name, value in COMPILE_CACHE_ENV.items():
    monkeypatch.setenv(name, value.format(tmp=tmp_path))
  cmp = tiny_compare(tmp_path)
  summary = compare(cmp, progress=False)
  out = Path(cmp.out_dir)
  results = json.loads((out / RESULTS_FILE).read_text())
  runs = results["runs"]
  assert sorted((run["model"], run["seed"]) for run in runs) == sorted(
      (model, seed) for model in MODELS for seed in cmp.seeds)

  for run in runs:
    rows = metric_rows(run["run_dir"])
    final = [row for row in rows if "val_loss" in row][-1]
    assert final["step"] == run["step"] == TINY_STEPS
    assert run["val_loss"] == final["val_loss"] and run["val_bpb"] == final["val_bpb"]
    assert run["train_loss"] == final["train_loss"]
    speeds = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
    assert run["train_tokens_per_s"] == pytest.approx(np.median(speeds[1:]))
    assert run["checkpoint_mib"] > 0 and run["peak_rss_mib"] > 0
    assert run["sample_tokens_per_s"] > 0
    if run["model"] == "gpt_oss":
      assert run["params_active"] < run["params_total"]  # 2 of 4 experts per token
    else:
      assert run["params_active"] == run["params_total"]

  # The summary is the seeds' mean and sample std; the relative row pairs runs by seed.
  for model in MODELS:
    losses = [run["val_loss"] for run in runs if run["model"] == model]
    stats = results["summary"]["models"][model]["val_loss"]
    assert stats["mean"] == pytest.approx(np.mean(losses))
    assert stats["std"] == pytest.approx(np.std(losses, ddof=1))
  by_key = {(run["model"], run["seed"]): run["val_loss"] for run in runs}
  relative = [100 * (by_key["gpt_oss", s] / by_key["gpt2", s] - 1) for s in cmp.seeds]
  assert summary["relative_percent"]["val_loss"]["mean"] == pytest.approx(np.mean(relative))

  report = (out / REPORT_FILE).read_text()
  assert "| metric | GPT-OSS | GPT-2 |" in report
  val_row = next(line for line in report.splitlines() if line.startswith("| val loss"))
  assert val_row.count(" ± ") == 3  # both models and the relative difference
  assert "GPT-OSS vs GPT-2 val loss:" in report and "jax backend" in report
  for plot in (VAL_PLOT_FILE, TRAIN_PLOT_FILE):
    assert (out / plot).read_bytes()[:4] == PNG_MAGIC

  # A rerun trains nothing: every run's saved measurement is reused as it was.
  saved = [(Path(run["run_dir"]) / RUN_RESULT_FILE).read_text() for run in runs]
  compare(cmp, progress=False)
  assert [(Path(run["run_dir"]) / RUN_RESULT_FILE).read_text() for run in runs] == saved
  assert json.loads((out / RESULTS_FILE).read_text())["runs"] == runs
  # Other settings in the same folder are refused, not resumed into a hybrid of two runs.
  with pytest.raises(ConfigError, match="other settings"):
    compare(dataclasses.replace(cmp, sample_tokens=4), progress=False)
