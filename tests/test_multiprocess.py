"""Two JAX processes (jax.distributed over loopback, gloo collectives) train exactly like one."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.loop import train
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
PROCESSES = 2
STEPS = 6
# The test costs 105-125 CPU-seconds, nearly all compiling (train, eval and sampling steps, once
# per process): two to three minutes on a busy 2-core machine. Past this deadline, counted from
# the launch, the children are killed: never left to hang CI.
CHILD_DEADLINE_S = 300
# What a child prints last, so the test can tell the runtime really spanned both processes.
TOPOLOGY_TAG = "multiprocess topology:"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("token-cache")


def _free_loopback_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


# Trains tiny_run(run_dir, cache_dir) with the overrides in argv, then reports the topology.
CHILD_CODE = f"""
import sys, jax
from nanogptoss_jax.training.config_files import apply_overrides
from nanogptoss_jax.training.loop import train
from tests.train_helpers import tiny_run
train(apply_overrides(tiny_run(sys.argv[1], sys.argv[2]), sys.argv[3:]), progress=False)
print({TOPOLOGY_TAG!r}, jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
"""


def _train_command(run_dir: Path, cache_dir: Path, *overrides: str) -> list[str]:
  return [sys.executable, "-c", CHILD_CODE, str(run_dir), str(cache_dir), *overrides]


def _loss_rows(run_dir: Path) -> list[dict]:
  rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  return [row for row in rows if "loss" in row]


def _launch(run_dir: Path, cache_dir: Path, logs: Path, *overrides: str) -> list[subprocess.Popen]:
  port = _free_loopback_port()
  base_env = {name: value for name, value in os.environ.items()
              if "proxy" not in name.lower()}  # JAX warns that proxies may hang the handshake
  procs = []
  for index in range(PROCESSES):
    env = base_env | {
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        # The coordinator would otherwise listen on every interface ([::]:port).
        "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(PROCESSES), "JAX_PROCESS_ID": str(index),
        "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    # fsdp=2 over one device per process: parameters and optimiser state are split across the
    # processes, as is every batch, so each step all-gathers and reduces through gloo.
    cmd = _train_command(run_dir, cache_dir, f"train.steps={STEPS}", f"train.eval_every={STEPS}",
                         f"train.ckpt_every={STEPS}", "execution.fsdp=2", *overrides)
    with open(logs / f"process{index}.log", "w") as log:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _wait_all(procs: list[subprocess.Popen], deadline: float) -> list[int | None]:
  """Exit codes; None for a child still running at the deadline (then all are killed)."""
  while time.time() < deadline and any(proc.poll() is None for proc in procs):
    # One dead child leaves the other blocked in a collective until JAX's own heartbeat
    # timeout (minutes): a failure ends the run at once.
    if any(proc.poll() not in (None, 0) for proc in procs):
      break
    time.sleep(0.2)
  codes = [proc.poll() for proc in procs]
  _kill_leftovers(procs)
  return codes


def _kill_leftovers(procs: list[subprocess.Popen]) -> None:
  """Never leaves a child running, e.g. blocked in a collective after its partner failed."""
  for proc in procs:
    if proc.poll() is None:
      proc.kill()  # SIGKILL: the trainer turns SIGTERM into "save, then stop"
      proc.wait()


def _tails(logs: Path) -> str:
  return "\n".join(f"--- process {i} (last lines) ---\n"
                   + "\n".join((logs / f"process{i}.log").read_text().splitlines()[-30:])
                   for i in range(PROCESSES))


def test_two_processes_match_one_process(tmp_path, cache_dir):
  logs = tmp_path / "logs"
  logs.mkdir()
  # The single-process reference runs here while the children run: the runs are independent.
  deadline = time.time() + CHILD_DEADLINE_S
  procs = _launch(tmp_path / "two", cache_dir, logs)
  try:
    train(tiny_run(tmp_path / "one", cache_dir, steps=STEPS, eval_every=STEPS, ckpt_every=STEPS),
          progress=False)
    codes = _wait_all(procs, deadline)
  finally:
    _kill_leftovers(procs)
  assert codes == [0] * PROCESSES, f"exit codes {codes}\n{_tails(logs)}"
  for index in range(PROCESSES):
    tags = [line for line in (logs / f"process{index}.log").read_text().splitlines()
            if line.startswith(TOPOLOGY_TAG)]
    # (process index, process count, global device count)
    assert tags == [f"{TOPOLOGY_TAG} {index} {PROCESSES} {PROCESSES}"], _tails(logs)

  expected, sharded = _loss_rows(tmp_path / "one"), _loss_rows(tmp_path / "two")
  # Only process 0 writes metrics: one row per step, not one per process.
  assert [row["step"] for row in sharded] == [row["step"] for row in expected] == list(
      range(1, STEPS + 1))
  np.testing.assert_allclose([row["loss"] for row in sharded], [row["loss"] for row in expected],
                             rtol=2e-5)

  # Every process wrote its shards of the checkpoint; one process alone reads it back whole.
  checkpoints = ckpt.RunCheckpoints(tmp_path / "two")
  assert checkpoints.latest_step() == STEPS
  checkpoints.close()
  model, tokenizer = weights.load_checkpoint(tmp_path / "two")
  reference, _ = weights.load_checkpoint(tmp_path / "one")
  assert tokenizer.vocab_size == model.cfg.vocab_size
  loaded, wanted = nnx.state(model, nnx.Param), nnx.state(reference, nnx.Param)
  assert jax.tree.structure(loaded) == jax.tree.structure(wanted)
  # Adam divides by sqrt(v), so reduction-order noise in a near-zero gradient can move a weight
  # by up to lr per step; 1e-4 is far below the ~2e-2 weight scale a misplaced shard would show.
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(wanted)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-4)


def test_sigterm_to_one_process_stops_both_at_one_saved_step(tmp_path, cache_dir):
  """A preemption notice reaching one process (as SLURM may deliver it) stops every process at
  the same step, after saving it: none is left waiting in a collective."""
  logs = tmp_path / "logs"
  logs.mkdir()
  run_dir = tmp_path / "run"
  # Many steps, rare checkpoints and evals: only the stop itself saves.
  procs = _launch(run_dir, cache_dir, logs, "train.steps=100000", "train.ckpt_every=100000",
                  "train.eval_every=100000", "train.log_every=1")
  deadline = time.time() + CHILD_DEADLINE_S
  try:
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (
        metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
      assert all(proc.poll() is None for proc in procs), _tails(logs)
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    codes = _wait_all(procs, deadline)
  finally:
    _kill_leftovers(procs)
  assert codes == [0] * PROCESSES, f"exit codes {codes}\n{_tails(logs)}"
  checkpoints = ckpt.RunCheckpoints(run_dir)
  saved = checkpoints.latest_step()
  checkpoints.close()
  assert saved is not None and saved >= 3, _tails(logs)
  # The checkpoint (both processes write it together) holds the last step process 0 logged.
  assert _loss_rows(run_dir)[-1]["step"] == saved
