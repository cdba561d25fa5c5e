"""MXFP4 quantization of float weights (model/mxfp4.quantize) and of whole models
(model/quantize.py), against an independent nearest-value oracle and OpenAI's reference reader."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nanogptoss_jax
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import mxfp4
from nanogptoss_jax.model.config import Gpt2Config
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gpt2 import Gpt2
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.quantize import quantization_error
from nanogptoss_jax.pretrained import safetensors_io
from nanogptoss_jax.pretrained.load import load_pretrained
from tests.pretrained_helpers import TINY, write_original
from tests.factories import relative_error

torch = pytest.importorskip("torch")
MAGNITUDES = np.array(mxfp4.FP4_VALUES[:8])  # e2m1 magnitudes, code = index (+8 if negative)


def oracle_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The MXFP4 rule by brute force in float64: scale = the smallest power of two >= max|x| / 6,
  each x / scale to the nearest e2m1 magnitude (a tie to the even code), sign in bit 3."""
  x = x.astype(np.float64).reshape(*x.shape[:-1], -1, 32)
  mantissa, exponent = np.frexp(np.abs(x).max(-1) / 6)  # value = mantissa * 2^exponent
  exponent = np.where(mantissa == 0.5, exponent - 1, exponent)  # already a power of two
  zero = mantissa == 0
  scale = np.where(zero, 0.0, np.ldexp(1.0, exponent))
  q = np.where(zero[..., None], 0.0, np.abs(x) / np.where(zero, 1.0, scale)[..., None])
  distance = np.abs(q[..., None] - MAGNITUDES)  # [..., G, 32, 8]
  nearest = distance == distance.min(-1, keepdims=True)
  # Among equally near magnitudes take the even code (round half to even).
  code = np.where(nearest & (np.arange(8) % 2 == 0), np.arange(8), 99).min(-1)
  code = np.where(nearest.sum(-1) == 1, distance.argmin(-1), code).astype(np.uint8)
  code |= np.signbit(x).astype(np.uint8) << 3
  blocks = code[..., 0::2] | (code[..., 1::2] << 4)
  scales = np.where(zero, 0, exponent + mxfp4.SCALE_BIAS).astype(np.uint8)
  return blocks, scales


def weights_of_many_kinds(rng) -> list[np.ndarray]:
  """Gaussians at magnitudes 1e-20..1e20, exact ties, zero blocks and -0.0, near float32 max."""
  gaussian = rng.standard_normal((48, 256)) * 10.0 ** rng.integers(-20, 20, (48, 1))
  grid = np.array([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6])
  ties = rng.choice(np.concatenate([grid, -grid]), (48, 256))
  ties[:, ::32] = 6.0  # pins each block's scale so the midpoints above are exact ties
  ties *= 2.0 ** rng.integers(-30, 30, (48, 1))
  zeros = np.zeros((4, 64))
  zeros[1] = -0.0
  zeros[2, 5], zeros[3, 40] = 1e-3, -7.0
  huge = rng.uniform(-1, 1, (8, 128)) * 3.0e38
  return [a.astype(np.float32) for a in (gaussian, ties, zeros, huge)]


def decoded_by_reference(tmp_path, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """OpenAI's reader (gpt_oss.torch.weights.Checkpoint) decoding blocks/scales from a file."""
  from gpt_oss.torch.weights import Checkpoint
  name = "block.0.mlp.mlp1_weight"
  safetensors_io.write(os.path.join(tmp_path, "experts.safetensors"),
                       {f"{name}.blocks": blocks, f"{name}.scales": scales})
  reader = Checkpoint(str(tmp_path), torch.device("cpu"))
  return reader.get(name).float().numpy()  # bf16 holds every MXFP4 value; -> f32 is exact


def published_style_blocks(rng, shape, scale_range=(100, 150)):
  """Random blocks whose largest magnitude code is 4.0 or 6.0, the blocks the rule gives back
  bit for bit (a block topped by 3.0 at scale s decodes like one topped by 6.0 at s - 1)."""
  codes = rng.integers(0, 16, (*shape, 32), dtype=np.uint8)
  top = rng.integers(0, 32, shape)
  np.put_along_axis(codes, top[..., None], rng.choice(np.uint8([6, 7, 14, 15]), (*shape, 1)), -1)
  blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
  return blocks, rng.integers(*scale_range, shape, dtype=np.uint8)


def test_quantize_matches_the_nearest_value_oracle():
  rng = np.random.default_rng(0)
  for x in weights_of_many_kinds(rng):
    blocks, scales = mxfp4.quantize(jnp.asarray(x))
    want_blocks, want_scales = oracle_quantize(x)
    np.testing.assert_array_equal(np.asarray(scales), want_scales)
    np.testing.assert_array_equal(np.asarray(blocks), want_blocks)
  # bfloat16 weights quantize as their float32 values do.
  x = weights_of_many_kinds(rng)[0]
  np.testing.assert_array_equal(np.asarray(mxfp4.quantize(jnp.asarray(x, jnp.bfloat16))[0]),
                                oracle_quantize(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32))[0])


def test_reference_reader_decodes_our_blocks_as_we_do(tmp_path):
  x = np.random.default_rng(1).standard_normal((3, 40, 128)).astype(np.float32) * 0.02
  blocks, scales = (np.asarray(a) for a in mxfp4.quantize(jnp.asarray(x)))
  assert blocks.shape == (3, 40, 4, 16) and scales.shape == (3, 40, 4)
  theirs = decoded_by_reference(tmp_path, blocks, scales)
  ours = np.asarray(mxfp4.decode(jnp.asarray(blocks), jnp.asarray(scales)))
  np.testing.assert_array_equal(ours.reshape(theirs.shape).view(np.uint32), theirs.view(np.uint32))


def test_published_style_blocks_round_trip_bit_exactly(tmp_path):
  blocks, scales = published_style_blocks(np.random.default_rng(2), (4, 24, 3))
  values = decoded_by_reference(tmp_path, blocks, scales)  # [4, 24, 96]
  again_blocks, again_scales = mxfp4.quantize(jnp.asarray(values))
  np.testing.assert_array_equal(np.asarray(again_scales), scales)
  np.testing.assert_array_equal(np.asarray(again_blocks), blocks)


def test_decode_after_quantize_is_a_projection():
  """On any blocks, re-quantizing decoded values keeps every value (and the sign of zeros);
  only the scale of a block topped by <= 3.0 moves down, its codes doubling."""
  rng = np.random.default_rng(3)
  blocks = rng.integers(0, 256, (64, 8, 16), dtype=np.uint8)
  blocks[:8] &= 0x55  # codes <= 5 (3.0): tops of 3.0 and below
  blocks[8:12] &= 0x88  # only +-0
  scales = rng.integers(8, 248, (64, 8), dtype=np.uint8)
  values = mxfp4.decode(jnp.asarray(blocks), jnp.asarray(scales))
  once = mxfp4.quantize(values)
  np.testing.assert_array_equal(np.asarray(mxfp4.decode(*once)).view(np.uint32),
                                np.asarray(values).view(np.uint32))
  twice = mxfp4.quantize(mxfp4.decode(*once))
  for a, b in zip(once, twice):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A block whose top is 3.0 (code 5) at scale s: the rule picks s - 1 with 3.0 -> code 7 (6.0).
  block = np.zeros((1, 16), np.uint8)
  block[0, 0] = 0x15  # codes 5 (3.0) and 1 (0.5)
  b, s = mxfp4.quantize(mxfp4.decode(jnp.asarray(block), jnp.asarray([130], jnp.uint8)))
  assert int(s[0]) == 129 and int(b[0, 0]) == 0x27  # 6.0 and 1.0 at half the scale


def test_quantize_error_within_the_format_bound():
  """|x - decode(quantize(x))| <= half the e2m1 step at x / scale, times the scale; the scale
  never clips (max|x| / scale in (3, 6])."""
  rng = np.random.default_rng(4)
  x = np.concatenate([rng.standard_normal((32, 256)), rng.standard_t(2, (32, 256)) * 1e-3])
  x = x.astype(np.float32)
  blocks, scales = mxfp4.quantize(jnp.asarray(x))
  error = np.abs(np.asarray(mxfp4.decode(blocks, scales)) - x).reshape(64, -1, 32)
  scale = np.ldexp(1.0, np.asarray(scales, np.int64) - mxfp4.SCALE_BIAS)[..., None]
  q = np.abs(x.reshape(64, -1, 32)) / scale
  assert np.all((q.max(-1) > 3) & (q.max(-1) <= 6))
  half_step = np.where(q < 2, 0.25, np.where(q < 4, 0.5, 1.0))
  assert np.all(error <= half_step * scale)
  assert np.median(error / (half_step * scale)) < 0.6  # errors spread over the half-step


def test_quantize_refuses_a_length_not_a_multiple_of_32():
  with pytest.raises(ValueError, match="multiple"):
    mxfp4.quantize(jnp.zeros((4, 48)))


# ---- whole models: ng.quantize ----

def lut_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """The reference's decode in numpy: FP4 table (low nibble first) times 2^(scale - 127)."""
  codes = np.stack([blocks & 15, blocks >> 4], -1).reshape(*blocks.shape[:-1], 32)
  values = np.ldexp(np.array(mxfp4.FP4_VALUES)[codes], scales[..., None].astype(int) - 127)
  return values.reshape(*scales.shape[:-1], -1).astype(np.float32)


@nnx.jit
def logits_of(model, tokens):
  return model(tokens)


def flat_params(model) -> dict:
  return dict(nnx.to_flat_state(nnx.state(model)))


def with_random_biases(model, seed: int = 0):
  """model with every bias drawn at random: freshly built ones are zeros, which hide a mix-up."""
  rng = np.random.default_rng(seed)
  for path, variable in flat_params(model).items():
    if path[-1] in ("bias", "mlp1_bias", "mlp2_bias"):
      variable.set_value(jnp.asarray(rng.normal(0, 0.1, variable.shape), variable.dtype))
  return model


def dequantized_twin(float_model, quantized):
  """float_model with each expert matrix set to quantized's blocks decoded by lut_decode."""
  twin = nnx.clone(float_model)
  q = flat_params(quantized)
  for path, variable in flat_params(twin).items():
    if path[-1] in ("mlp1_weight", "mlp2_weight"):
      stem = path[-1].removesuffix("_weight")
      value = lut_decode(np.asarray(q[(*path[:-1], f"{stem}_blocks")][...]),
                         np.asarray(q[(*path[:-1], f"{stem}_scales")][...]))
      variable.set_value(jnp.asarray(np.swapaxes(value, -1, -2)))  # [.., E, out, in] -> ours
  return twin


@pytest.mark.parametrize("layers", ["loop", "scan"])
def test_quantized_model_computes_with_its_decoded_weights(layers):
  model = with_random_biases(GptOss(TINY, execution=ExecutionConfig(layers_impl=layers),
                                    rngs=nnx.Rngs(0)))
  quantized = nanogptoss_jax.quantize(model, experts="mxfp4")
  params = flat_params(quantized)
  assert not any(p[-1] in ("mlp1_weight", "mlp2_weight") for p in params)
  assert all(v[...].dtype == jnp.uint8 for p, v in params.items() if p[-1].endswith(
      ("_blocks", "_scales")))
  twin = dequantized_twin(model, quantized)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, TINY.vocab_size, (2, 12)))
  np.testing.assert_array_equal(np.asarray(logits_of(quantized, tokens)),
                                np.asarray(logits_of(twin, tokens)))
  # One token: the sorted dispatch then decodes only the experts it selects, a program XLA
  # fuses differently from the float twin's gather, so equal up to float32 rounding.
  assert relative_error(logits_of(quantized, tokens[:1, :1]), logits_of(twin, tokens[:1, :1])) <= 1e-6
  # Everything but the expert matrices is carried over as it was.
  for path, variable in flat_params(model).items():
    if path[-1] not in ("mlp1_weight", "mlp2_weight"):
      np.testing.assert_array_equal(np.asarray(params[path][...]), np.asarray(variable[...]))
  cost = quantization_error(model, quantized, tokens)
  assert 0 < cost["max_abs_logit_diff"] < 1 and 0 < cost["mean_kl"] < 1e-2
  float_bytes, mxfp4_bytes = cost["expert_bytes"]
  assert float_bytes / mxfp4_bytes == pytest.approx(4 / (0.5 + 1 / 32))  # 4.25 bits a weight


def test_a_loaded_published_model_requantizes_to_its_file(tmp_path):
  """Published-style experts loaded as floats come back as the file's blocks wherever the
  file's block is one the rule reproduces (top code 4.0 or 6.0), and as its values everywhere."""
  tensors = write_original(str(tmp_path))
  model = load_pretrained(str(tmp_path), dtype="float32", mxfp4="dequantize")[0]
  quantized = flat_params(nanogptoss_jax.quantize(model))
  checked = 0
  for layer in range(TINY.num_hidden_layers):
    for matrix in ("mlp1", "mlp2"):
      blocks = tensors[f"block.{layer}.mlp.{matrix}_weight.blocks"]
      scales = tensors[f"block.{layer}.mlp.{matrix}_weight.scales"]
      ours_b = np.asarray(quantized[("blocks", layer, "mlp", f"{matrix}_blocks")][...])
      ours_s = np.asarray(quantized[("blocks", layer, "mlp", f"{matrix}_scales")][...])
      codes = np.stack([blocks & 15, blocks >> 4], -1).reshape(*scales.shape, 32)
      canonical = ((codes & 7) >= 6).any(-1)
      np.testing.assert_array_equal(ours_b[canonical], blocks[canonical])
      np.testing.assert_array_equal(ours_s[canonical], scales[canonical])
      np.testing.assert_array_equal(lut_decode(ours_b, ours_s), lut_decode(blocks, scales))
      checked += canonical.sum()
  assert checked > 1000


def test_quantized_model_exports_to_transformers(tmp_path):
  transformers = pytest.importorskip("transformers")
  from nanogptoss_jax.pretrained.export import save_pretrained
  from nanogptoss_jax.pretrained.layout import open_checkpoint
  from nanogptoss_jax.pretrained.tokenizer import HarmonyTokenizer
  quantized = nanogptoss_jax.quantize(GptOss(TINY, rngs=nnx.Rngs(1)))
  tokenizer = HarmonyTokenizer()
  sized = type("Sized", (), dict(vocab_size=TINY.vocab_size, stop_ids=(),
                                 to_dict=staticmethod(tokenizer.to_dict)))()
  save_pretrained(quantized, sized, str(tmp_path), dtype="float32")
  assert any(name.endswith("_blocks") for name in open_checkpoint(str(tmp_path)).files)
  theirs = transformers.GptOssForCausalLM.from_pretrained(
      str(tmp_path), attn_implementation="eager",
      quantization_config=transformers.Mxfp4Config(dequantize=True)).float().eval()
  tokens = np.random.default_rng(6).integers(0, TINY.vocab_size, (2, 10))
  with torch.no_grad():
    want = theirs(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  assert relative_error(logits_of(quantized, jnp.asarray(tokens)), want) <= 1e-5


def test_quantize_refuses_what_it_cannot_do():
  model = GptOss(TINY, rngs=nnx.Rngs(0))
  with pytest.raises(UserError, match=r"experts='int4'.*\('mxfp4',\)"):
    nanogptoss_jax.quantize(model, experts="int4")
  with pytest.raises(UserError, match="GPT-OSS"):
    nanogptoss_jax.quantize(Gpt2(Gpt2Config(num_hidden_layers=1, vocab_size=64, hidden_size=32,
                                             num_attention_heads=2), rngs=nnx.Rngs(0)))
  broken = nnx.clone(model)
  weight = broken.blocks[1].mlp.mlp2_weight
  weight.set_value(weight[...].at[0, 0, 0].set(jnp.nan))
  with pytest.raises(UserError, match="NaN or Inf"):
    nanogptoss_jax.quantize(broken)
  quantized = nanogptoss_jax.quantize(model)
  assert nanogptoss_jax.quantize(quantized) is quantized
