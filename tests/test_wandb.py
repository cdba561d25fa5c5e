"""Weights & Biases beside metrics.jsonl, in wandb's offline mode (no network): what a run logged
is read back from wandb's own run files (records of wandb's protobuf `Record`)."""

import json
import os
import struct
import sys

import pytest

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.training.config_io import config_to_dict
from nanogptoss_jax.training.loop import PLOT_FILE, Trainer, train
from nanogptoss_jax.training.metrics_log import (METRICS_FILE, WANDB_PLOT_KEY, WANDB_RUN_FILE,
                                                 MetricsLog)
from tests.train_helpers import tiny_run

PROJECT = "nanogptoss-test"
# A .wandb file: a 7-byte header (":W&B", magic, version), then LevelDB-log chunks in 32 KiB
# blocks, each a 7-byte header (crc32c, length, type) and a piece of one serialized Record.
FILE_HEADER, BLOCK, CHUNK_HEADER = 7, 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(path):
  from wandb.proto import wandb_internal_pb2
  data = path.read_bytes()
  assert data[:4] == b":W&B", data[:8]
  position, pending = FILE_HEADER, b""
  while position + CHUNK_HEADER <= len(data):
    if BLOCK - position % BLOCK < CHUNK_HEADER:  # a block's tail too short for a chunk: padding
      position += BLOCK - position % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[position:position + CHUNK_HEADER])
    if kind == 0:  # zero padding to the block's end
      position += BLOCK - position % BLOCK
      continue
    pending += data[position + CHUNK_HEADER:position + CHUNK_HEADER + length]
    position += CHUNK_HEADER + length
    if kind in (FULL, LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      yield record


def _offline_runs(run_dir):
  """[(run record, {step: row}, run folder)] of each offline wandb process in run_dir, in order."""
  runs = []
  for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
    run, rows = None, {}
    for record in _records(next(folder.glob("run-*.wandb"))):
      if record.HasField("run"):
        run = record.run
      elif record.HasField("history"):
        row = {}
        for item in record.history.item:  # a nested key (an image's fields) is a path
          *parents, leaf = list(item.nested_key) or [item.key]
          place = row
          for parent in parents:
            place = place.setdefault(parent, {})
          place[leaf] = json.loads(item.value_json)
        rows[row["_step"]] = {key: value for key, value in row.items()
                              if not key.startswith("_")}
    runs.append((run, rows, folder))
  return runs


def _jsonl_by_step(run_dir):
  """metrics.jsonl's rows, a train row and an eval row of one step merged, as wandb keeps them."""
  rows = {}
  for line in (run_dir / METRICS_FILE).read_text().splitlines():
    row = json.loads(line)
    rows.setdefault(row["step"], {}).update(row)
  return rows


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
  """A run stopped after step 6 (its checkpoint), then resumed to step 12 by a new Trainer."""
  if not os.environ.get("CI"):  # CI installs the wandb extra: there these tests must not skip
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
  root = tmp_path_factory.mktemp("wandb")
  cfg = tiny_run(root / "run", root / "cache", steps=12, eval_every=6, ckpt_every=6,
                 wandb_project=PROJECT)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    first = Trainer(cfg, progress=False)
    try:
      first.run(until=6)
    finally:
      first.close()
    train(cfg, progress=False)
  return cfg, root / "run"


def test_wandb_gets_the_rows_the_config_the_samples_and_the_plot(resumed_run):
  cfg, run_dir = resumed_run
  runs = _offline_runs(run_dir)
  logged = {}
  for _, rows, _ in runs:
    logged |= rows
  expected = _jsonl_by_step(run_dir)
  assert sorted(expected) == list(range(1, 13))
  plots = {step: row.pop(WANDB_PLOT_KEY) for step, row in logged.items() if WANDB_PLOT_KEY in row}
  assert logged == expected  # every row, every key, the samples among them
  assert all(isinstance(expected[step]["sample"], str) for step in (6, 12))
  saved_config = json.loads(json.dumps(config_to_dict(cfg)))  # tuples become lists
  for run, _, _ in runs:
    assert run.project == PROJECT
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    config.pop("_wandb")
    assert config == saved_config
  # The loss plot, at the last step: the PNG the run wrote, among that wandb run's files.
  assert list(plots) == [12] and plots[12]["_type"] == "image-file"
  assert (runs[-1][2] / "files" / plots[12]["path"]).read_bytes() == (
      run_dir / PLOT_FILE).read_bytes()


def test_a_resume_continues_the_same_wandb_run(resumed_run):
  _, run_dir = resumed_run
  runs = _offline_runs(run_dir)
  assert len(runs) == 2  # one wandb process per Trainer
  run_id = (run_dir / WANDB_RUN_FILE).read_text().strip()
  assert [run.run_id for run, _, _ in runs] == [run_id, run_id]
  assert sorted(runs[0][1]) == list(range(1, 7)) and sorted(runs[1][1]) == list(range(7, 13))


def test_wandb_project_without_the_package_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  cfg = tiny_run(tmp_path / "run", tmp_path / "cache", wandb_project=PROJECT)
  with pytest.raises(UserError, match=r"pip install 'nanogptoss-jax\[wandb\]'"):
    MetricsLog(tmp_path, True, cfg)
