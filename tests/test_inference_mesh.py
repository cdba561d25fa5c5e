"""Multi-device inference without weight traffic: on a mesh whose tensor axis splits heads,
vocabulary and experts (and whose expert axis splits experts), the serving engine's decode
chunk draws one device's tokens and no collective of it moves a weight (the compiled HLO of 8
forced CPU devices, tests/inference_mesh_child.py); and gpt-oss-120b with MXFP4 experts kept
fits in 9 GB per device on 8 devices (by eval_shape)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanogptoss_jax.model.config import GPT_OSS_120B, GPT_OSS_20B
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import abstract_loop_model
from nanogptoss_jax.parallel.rules import device_bytes

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


@pytest.fixture(scope="module")
def decoded(tmp_path_factory):
  out = tmp_path_factory.mktemp("inference") / "decode.json"
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                      "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
  result = subprocess.run([sys.executable, str(REPO / "tests" / "inference_mesh_child.py"),
                           str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["tensor8", "expert2-tensor4"])
def test_a_decode_step_moves_activations_only(decoded, mesh):
  seen = decoded[mesh]
  assert seen["drawn"] == decoded["single"]  # greedy tokens of one device
  operands = {tuple(shape) for shape in seen["operands"]}
  # The step does communicate (partial sums of split heads and experts), none of it a weight
  # shard: every operand of an all-gather or all-reduce is shaped by the 2 decoding slots.
  assert operands and all(shape[0] == 2 for shape in operands), sorted(operands)
  assert not operands & {tuple(shape) for shape in seen["shards"]}, sorted(operands)


def test_gpt_oss_120b_with_mxfp4_kept_fits_in_9_gb_per_device_on_8():
  published = ExecutionConfig(expert_format="mxfp4", dtype="bfloat16", param_dtype="bfloat16")
  big = abstract_loop_model(GPT_OSS_120B, published)
  assert device_bytes(big, {"tensor": 8}) <= 9 * GB  # 8.18 GB
  assert device_bytes(big, {"expert": 2, "tensor": 4}) <= 9 * GB  # 8.71 GB
  # The whole model on one device: what the split divides (65.2 GB).
  assert device_bytes(big, {"tensor": 1}) > 60 * GB
  small = abstract_loop_model(GPT_OSS_20B, published)
  assert device_bytes(small, {"tensor": 8}) * 7 < device_bytes(small, {"tensor": 1})
