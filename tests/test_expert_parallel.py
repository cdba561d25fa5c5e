"""Expert parallelism (kernels/expert_parallel.py) on 8 forced CPU devices: experts split over the
mesh's expert axis, tokens exchanged with all_to_all, equal to one device in loss, gradients
and a training run's per-step losses; a run resumes on another mesh shape; dropped assignments
at a small capacity are exactly those past the slots, and counted."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogptoss_jax.training.loop import train
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
STEPS = 10


def tiny_ep_run(run_dir, cache_dir, **mesh):
  """tiny_run for STEPS steps on the execution mesh `mesh` (its 4 experts, 2 per token)."""
  cfg = tiny_run(run_dir, cache_dir, steps=STEPS, eval_every=STEPS, ckpt_every=5,
                 sample_tokens=0)
  return dataclasses.replace(cfg, execution=cfg.execution.replace(**mesh))


def losses(run_dir) -> list[float]:
  rows = map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
  return [row["loss"] for row in rows if "loss" in row]


def _child(*args, timeout=600) -> None:
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                      "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
  result = subprocess.run([sys.executable, str(REPO / "tests" / "expert_parallel_child.py"),
                           *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def numerics(tmp_path_factory):
  out = tmp_path_factory.mktemp("ep") / "numerics.json"
  _child("numerics", out)
  return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["data2-expert4-c0.0", "fsdp2-expert4-c2.0"])
def test_expert_parallel_loss_and_gradients_equal_one_device(numerics, case):
  seen = numerics[case]
  assert abs(seen["loss"] - seen["single"]) <= TOLERANCE * abs(seen["single"])
  assert seen["grad_error"] <= TOLERANCE
  assert seen["dropped"] == 0
  # Really parallel: tokens cross devices (forward and backward) and each device holds 2 of
  # the 8 experts, the E axis split over `expert`.
  assert seen["all_to_all"] >= 4
  assert seen["mlp1"] and all(spec.startswith("P('expert'") for spec in seen["mlp1"])


def test_gpus_and_tpus_get_the_ragged_collective_which_equals_the_slots(numerics):
  """The step lowered for CUDA and TPU exchanges with ragged_all_to_all (forward and backward);
  the ragged exchange, run here with the collective emulated from all_gathers as its docstring
  defines it, equals the fixed-slot one in outputs and gradients, dropping nothing."""
  lowered = numerics["data2-expert4-c0.0"]["ragged"]
  assert lowered["cuda"] >= 4 and lowered["tpu"] >= 4, lowered  # 2 layers x 2 ways, + backward
  seen = numerics["ragged"]
  assert seen["error"] <= TOLERANCE and seen["grad_error"] <= TOLERANCE and seen["dropped"] == 0


def test_assignments_past_the_capacity_are_dropped_and_counted(numerics):
  seen = numerics["dropping"]
  assert seen["error"] <= TOLERANCE
  assert seen["dropped"] == seen["expected"] and sum(seen["expected"]) > 0


def test_a_run_on_expert_meshes_matches_one_device_and_resumes_on_another_shape(tmp_path):
  """A run of 5 steps on data 2 x expert 4, stopped and resumed for 5 more on fsdp 2 x
  expert 4, gives one device's per-step losses: both meshes equal one device, and a
  checkpoint moves between them."""
  single = tiny_ep_run(tmp_path / "single", tmp_path / "cache")
  train(single, progress=False)
  _child("training", tmp_path, tmp_path / "cache", tmp_path / "runs.json")
  seen = json.loads((tmp_path / "runs.json").read_text())
  want = losses(tmp_path / "single")
  assert len(want) == STEPS
  for name in ("moved",):
    assert len(seen[name]) == STEPS, name
    for ours, theirs in zip(seen[name], want):
      assert abs(ours - theirs) <= TOLERANCE * abs(theirs), (name, seen[name], want)
