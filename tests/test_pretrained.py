"""load_pretrained against OpenAI's reference (original layout) and transformers (HF layout)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from nanogptoss_jax.kernels import mxfp4 as kernel_mxfp4
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model import mxfp4 as plain_mxfp4
from nanogptoss_jax.pretrained.export import save_pretrained
from nanogptoss_jax.pretrained.load import load_pretrained
from tests.pretrained_helpers import TINY, write_original
from tests.factories import relative_error
from tests.reference import reference_model_module

torch = pytest.importorskip("torch")
TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 12), dtype=np.int32)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("original"))
  write_original(path)
  return path


@pytest.fixture(scope="module")
def reference_logits(original_dir):
  model = reference_model_module().Transformer.from_checkpoint(original_dir, "cpu").float()
  with torch.no_grad():
    return np.stack([model(torch.as_tensor(row, dtype=torch.long)).numpy() for row in TOKENS])


@pytest.fixture(scope="module")
def loaded(original_dir):
  return {mode: load_pretrained(original_dir, dtype="float32", mxfp4=mode)[0]
          for mode in ("keep", "dequantize")}


def test_mxfp4_decode_is_bit_exact_against_the_reference_reader(original_dir):
  from gpt_oss.torch.weights import Checkpoint
  reader = Checkpoint(original_dir, torch.device("cpu"))
  from nanogptoss_jax.pretrained.layout import open_checkpoint
  ckpt = open_checkpoint(original_dir)
  for name in ("block.0.mlp.mlp1_weight", "block.1.mlp.mlp2_weight"):
    want = reader.get(name).float().numpy().view(np.uint32)  # bf16 -> f32 is exact
    blocks, scales = ckpt.get(f"{name}.blocks"), ckpt.get(f"{name}.scales")
    for decode in (plain_mxfp4.decode, kernel_mxfp4.decode):
      for dtype in (jnp.float32, jnp.bfloat16):
        got = np.asarray(decode(blocks, scales, dtype).astype(jnp.float32))
        np.testing.assert_array_equal(got.reshape(want.shape).view(np.uint32), want)
    np.testing.assert_array_equal(plain_mxfp4.decode_numpy(blocks, scales).view(np.uint32), want)


@pytest.mark.parametrize("mode", ["keep", "dequantize"])
def test_original_layout_matches_the_reference(loaded, reference_logits, mode):
  model = loaded[mode]
  mlp = model.blocks[0].mlp
  if mode == "keep":
    assert mlp.mlp1_blocks[...].dtype == jnp.uint8 and not hasattr(mlp, "mlp1_weight")
  else:
    assert mlp.mlp1_weight[...].dtype == jnp.float32
  assert relative_error(model(jnp.asarray(TOKENS)), reference_logits) <= TOLERANCE


@pytest.mark.parametrize("impl", ["sorted", "dense", "ragged"])
def test_keep_works_with_every_dispatch(loaded, reference_logits, impl):
  model = loaded["keep"]
  original = model.blocks[0].mlp.execution
  try:
    for block in model.blocks:
      block.mlp.execution = original.replace(moe_impl=impl)
    assert relative_error(model(jnp.asarray(TOKENS)), reference_logits) <= TOLERANCE
    # One token: the sorted dispatch then decodes only the selected experts.
    first = model(jnp.asarray(TOKENS[:1, :1]))
    assert relative_error(first, reference_logits[:1, :1]) <= TOLERANCE
  finally:
    for block in model.blocks:
      block.mlp.execution = original


def _transformers_logits(path, quantized):
  transformers = pytest.importorskip("transformers")
  options = {}
  if quantized:
    options["quantization_config"] = transformers.Mxfp4Config(dequantize=True)
  model = transformers.GptOssForCausalLM.from_pretrained(
      path, attn_implementation="eager", **options).float().eval()
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("mode", ["keep", "dequantize"])
def test_hugging_face_layout_matches_transformers(loaded, reference_logits, tmp_path, mode):
  hf_dir = str(tmp_path / "hf")
  from nanogptoss_jax.pretrained.tokenizer import HarmonyTokenizer
  save_pretrained(loaded[mode], _SizedTokenizer(HarmonyTokenizer(), TINY.vocab_size), hf_dir,
                  dtype="float32", max_shard_bytes=200_000)
  index = json.load(open(os.path.join(hf_dir, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1  # sharded over several files
  quantized = mode == "keep"
  assert any(name.endswith("_blocks") for name in index["weight_map"]) == quantized
  theirs = _transformers_logits(hf_dir, quantized)
  assert relative_error(theirs, reference_logits) <= TOLERANCE
  for load_mode in ("keep", "dequantize"):
    ours = load_pretrained(hf_dir, dtype="float32", mxfp4=load_mode)[0]
    assert relative_error(ours(jnp.asarray(TOKENS)), theirs) <= TOLERANCE


class _SizedTokenizer:
  """gpt-oss's tokenizer cut to a test model's vocabulary (ids below vocab_size)."""

  def __init__(self, tokenizer, vocab_size):
    self.vocab_size, self.stop_ids = vocab_size, ()
    self.to_dict = tokenizer.to_dict


def test_published_sizes_fit_with_keep():
  from nanogptoss_jax.model.config import GPT_OSS_20B, GPT_OSS_120B
  from nanogptoss_jax.model.registry import abstract_model
  from nanogptoss_jax.pretrained.load import model_bytes
  # Published checkpoints: bf16 everywhere but the experts (uint8 blocks + scales).
  published = ExecutionConfig(expert_format="mxfp4", dtype="bfloat16", param_dtype="bfloat16")
  sizes = {name: model_bytes(abstract_model(cfg, published)) / 1e9
           for name, cfg in (("20b", GPT_OSS_20B), ("120b", GPT_OSS_120B))}
  assert 13.0 < sizes["20b"] <= 14.0 and 64.0 < sizes["120b"] <= 66.0, sizes


# Loads in a child with 8 forced host devices: the default mesh (8 x tensor) and an explicit
# 2 x 4 (data, fsdp) one. Writes, per mesh, an expert tensor's spec and shard shapes, and logits.
MESH_CHILD = """
import json, sys
import jax, numpy as np
from jax.sharding import AxisType
from nanogptoss_jax.pretrained.load import load_pretrained
path, tokens, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3]
assert jax.device_count() == 8, jax.device_count()
explicit = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
seen = {}
for tag, mesh in (("default", None), ("explicit", explicit)):
  model = load_pretrained(path, dtype="float32", mxfp4="keep", mesh=mesh)[0]
  blocks = model.blocks[0].mlp.mlp1_blocks[...]
  seen[tag] = dict(spec=[str(a) for a in blocks.sharding.spec],
                   shards=[list(s.data.shape) for s in blocks.addressable_shards])
  np.save(f"{out}-{tag}.npy", np.asarray(model(jax.numpy.asarray(tokens))))
json.dump(seen, open(f"{out}.json", "w"))
"""


def test_mesh_load_shards_by_the_rules_and_matches_one_device(original_dir, loaded, tmp_path):
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  np.save(tmp_path / "tokens.npy", TOKENS)
  env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                      "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
      [sys.executable, "-c", MESH_CHILD, original_dir, str(tmp_path / "tokens.npy"),
       str(tmp_path / "logits")], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  seen = json.load(open(tmp_path / "logits.json"))
  blocks_shape = tuple(loaded["keep"].blocks[0].mlp.mlp1_blocks[...].shape)
  # [E, 2F, D/32, 16] with E = 4: the default mesh puts the 8 devices on the tensor axis, which
  # splits experts only 8 at a time, so these stay whole; the explicit mesh's 4 fsdp devices
  # split 2F (the experts are fsdp's to split no more), replicated over its data axis.
  for tag, axis, split in (("default", None, 1), ("explicit", "fsdp", 4)):
    spec, shards = seen[tag]["spec"], seen[tag]["shards"]
    assert (axis in spec if axis else set(spec) == {"None"}) and len(shards) == 8, seen[tag]
    assert all(np.prod(s) * split == np.prod(blocks_shape) for s in shards), seen[tag]
    ours = np.load(tmp_path / f"logits-{tag}.npy")
    single = np.asarray(loaded["keep"](jnp.asarray(TOKENS)))
    # Only the order of the sharded sums differs: float32 rounding, not a different model.
    assert relative_error(ours, single) <= TOLERANCE  # measured 1.6e-6
