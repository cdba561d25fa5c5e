"""Every program we ship lowers for CUDA and for TPU on this CPU, at its real shapes.

`jax.export` traces each program with abstract arguments (ShapeDtypeStructs: nothing is
allocated) and lowers it to StableHLO for the named platform, Pallas kernels to their Triton
(GPU) or Mosaic (TPU) custom calls. This proves lowering only: it does NOT compile PTX or Mosaic
(shared memory, registers, VMEM limits show only on the device: benchmarks/gpu_check.sh), and
nothing here runs. Each program is then checked for what it must hold on that platform: the
kernels `auto` picks for the execution's target `platform` (not the backend this process runs
on), and no [tokens, vocab] float32 logits in a chunked-loss step.
"""

import contextlib
import dataclasses
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax import export

from nanogptoss_jax.kernels.pallas_attention import pallas_attention
from nanogptoss_jax.model import choices
from nanogptoss_jax.model.attention import visible
from nanogptoss_jax.model.config import GPT_OSS_20B
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.serving import engine, prefill
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.training.state import abstract_train_state
from nanogptoss_jax.training.step import make_eval_step, make_train_step

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# JAX's names for the lowering platforms, and ours (ExecutionConfig.platform) for each.
TARGETS = {"cuda": "gpu", "tpu": "tpu"}
TRITON = "__gpu$xla.gpu.triton"  # the Triton-style Pallas kernel's custom call (JAX 0.10-0.12)
MOSAIC = "tpu_custom_call"  # any Mosaic TPU kernel, splash included
# Custom calls outside export's stable list; allowed because we only lower, never serialise.
ALLOWED = [export.DisabledSafetyCheck.custom_call(name) for name in (TRITON, MOSAIC)]


def target_device(platform: str):
  """A context naming the GPU a CUDA lowering is for: JAX >= 0.11 reads the Triton kernel's
  target (compute capability) from the abstract mesh's device and refuses to guess on a machine
  without a GPU; TPU lowering needs nothing."""
  if platform != "cuda":
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice("NVIDIA H200", None, "cuda")
  return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      (1,), ("target",), (jax.sharding.AxisType.Auto,), abstract_device=device))


def lowered(fn, platform: str, *args) -> str:
  """The StableHLO text of jit(fn) lowered for `platform` ("cuda" or "tpu")."""
  with target_device(platform):
    exported = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=ALLOWED)(*args)
  return exported.mlir_module()


def custom_calls(text: str) -> set[str]:
  return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text))


def vocab_buffers(text: str, vocab: int) -> list[tuple[int, ...]]:
  """Shapes of every float32 tensor in `text` with an axis of `vocab`."""
  shapes = {tuple(int(d) for d in dims.split("x") if d)
            for dims in re.findall(r"tensor<((?:\d+x)+)f32>", text)}
  return [shape for shape in shapes if vocab in shape]


def run_config(name: str, platform: str):
  cfg = load_config_file(CONFIGS / f"{name}.py")
  return dataclasses.replace(cfg, execution=cfg.execution.replace(platform=TARGETS[platform]))


def train_step_text(name: str, platform: str) -> tuple[str, object]:
  cfg = run_config(name, platform)
  graphdef, state, tx = abstract_train_state(cfg)
  micro = cfg.train.batch_size // cfg.train.grad_accum
  batch = jax.ShapeDtypeStruct((cfg.train.grad_accum, micro, cfg.train.context_len + 1),
                               jnp.int32)
  return lowered(make_train_step(graphdef, cfg, tx), platform, state, batch), cfg


@pytest.mark.parametrize("platform", TARGETS)
@pytest.mark.parametrize("name", ["nano", "medium", "medium_4k"])
def test_train_steps_lower_with_the_target_platforms_kernels(name, platform):
  text, cfg = train_step_text(name, platform)
  calls = custom_calls(text)
  # `auto` gives TPUs the splash kernel for training (keys = queries in order); GPUs keep the
  # plain-JAX flash/blocked kernels (the Triton one is untimed there), so no custom call at all.
  if platform == "tpu":
    assert MOSAIC in calls, f"{name} for TPU holds no splash kernel: {calls}"
  else:
    assert TRITON not in calls and MOSAIC not in calls, calls
  vocab, tokens = cfg.model.vocab_size, cfg.train.batch_size // cfg.train.grad_accum
  tokens *= cfg.train.context_len
  biggest = max(jnp.prod(jnp.array(shape)).item() for shape in vocab_buffers(text, vocab))
  if choices.loss_impl(cfg.execution.loss_impl, tokens, vocab) == "chunked":
    # Nothing V-wide is bigger than the unembedding matrix itself: the loss never holds
    # [tokens, V] logits (medium_4k: 20,000 x 201,088 would be 16 GB).
    assert biggest <= cfg.model.hidden_size * vocab, vocab_buffers(text, vocab)
  else:
    assert biggest >= tokens * vocab  # the fused loss does hold them: the check can fail


def test_auto_follows_the_execution_platform_not_this_backend():
  """On this CPU, the TPU step lowered with platform "auto" gets the CPU's choice (no splash);
  naming the target gives the TPU's kernels. Guards the rule that made the gate meaningful."""
  assert jax.default_backend() == "cpu"
  cfg = run_config("nano", "tpu")
  cfg = dataclasses.replace(cfg, execution=cfg.execution.replace(platform="auto"))
  graphdef, state, tx = abstract_train_state(cfg)
  batch = jax.ShapeDtypeStruct((1, 2, cfg.train.context_len + 1), jnp.int32)
  assert MOSAIC not in custom_calls(lowered(make_train_step(graphdef, cfg, tx), "tpu", state,
                                            batch))


@pytest.mark.parametrize("platform", TARGETS)
def test_the_eval_step_lowers(platform):
  cfg = run_config("medium", platform)
  graphdef, state, _ = abstract_train_state(cfg)
  batch = jax.ShapeDtypeStruct((4, cfg.train.context_len + 1), jnp.int32)
  text = lowered(make_eval_step(graphdef), platform, state.params, state.frozen, state.rest,
                 batch)
  assert (MOSAIC in custom_calls(text)) == (platform == "tpu")


def _engine_model(platform: str):
  """gpt-oss-20b with MXFP4 experts kept (as `load_pretrained(mxfp4="keep")` builds it), shapes
  only."""
  execution = ExecutionConfig(dtype="bfloat16", param_dtype="bfloat16", expert_format="mxfp4",
                              layers_impl="loop", platform=TARGETS[platform])
  return nnx.eval_shape(lambda: GptOss(GPT_OSS_20B, execution=execution, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("platform", TARGETS)
def test_serving_prefill_and_decode_chunk_lower_at_20b_with_mxfp4(platform):
  slots, context, prompt = 4, 1024, 128
  model = _engine_model(platform)
  graphdef, params = nnx.split(model)
  cache = jax.eval_shape(lambda: model.init_cache(slots, context))
  rows = jax.ShapeDtypeStruct((slots,), jnp.int32)
  tokens = jax.ShapeDtypeStruct((slots, prompt), jnp.int32)
  text = lowered(lambda p, c, t, pos, s: prefill._prefill_into(graphdef, p, c, t, pos, s, context),
                 platform, params, cache, tokens, tokens, rows)
  assert "xui8>" in text  # the experts stay as MXFP4 bytes, decoded inside the program
  keys = jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.arange(slots)))
  floats = jax.ShapeDtypeStruct((slots,), jnp.float32)
  active = jax.ShapeDtypeStruct((slots,), jnp.bool_)
  text = lowered(lambda *args: engine._decode_chunk(graphdef, *args), platform, params, cache,
                 rows, rows, active, keys, rows, floats, floats)
  assert "xui8>" in text


def test_pallas_attention_forward_and_backward_lower_for_cuda():
  """The Triton kernel (forward, and the dk/dv and dq kernels of its backward pass) at medium's
  attention shape; interpret=False as on a GPU."""
  shape = (2, 512, 4, 2, 64)  # [B, T, K, G, H]
  q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 4, 512, 64), jnp.bfloat16)  # [B, K, S, H]
  pos = jax.ShapeDtypeStruct((2, 512), jnp.int32)
  sinks = jax.ShapeDtypeStruct((4, 2), jnp.float32)

  def loss(q, k, v, sinks, pos):
    out = pallas_attention(q, k, v, pos, pos, window=128, sinks=sinks, visible=visible,
                           in_order=True, interpret=False)
    return out.astype(jnp.float32).sum()

  forward = lowered(loss, "cuda", q, kv, kv, sinks, pos)
  both = lowered(jax.grad(loss, argnums=(0, 1, 2, 3)), "cuda", q, kv, kv, sinks, pos)
  count = lambda text: text.count(f"stablehlo.custom_call @{TRITON}")
  assert count(forward) >= 1 and count(both) >= count(forward) + 2  # + dk/dv and dq kernels


def test_pallas_named_on_gpu_lowers_inside_a_train_step():
  """`attention_impl="pallas"` for the GPU target reaches the model's step (not interpret mode)."""
  cfg = run_config("nano", "cuda")
  cfg = dataclasses.replace(cfg, execution=cfg.execution.replace(attention_impl="pallas"))
  graphdef, state, tx = abstract_train_state(cfg)
  batch = jax.ShapeDtypeStruct((1, 2, cfg.train.context_len + 1), jnp.int32)
  assert TRITON in custom_calls(lowered(make_train_step(graphdef, cfg, tx), "cuda", state, batch))


@pytest.mark.parametrize("platform", TARGETS)
def test_qlora_step_lowers_at_20b_with_the_experts_as_published(platform):
  """configs/finetune_20b_lora.py's step (r 8 adapters on attention and experts, MXFP4 experts
  decoded inside it, remat) on one 2,048-token conversation: only adapters are differentiated
  and the experts enter the program as bytes."""
  cfg = run_config("finetune_20b_lora", platform)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=1,
                                                           grad_accum=1))
  graphdef, state, tx = abstract_train_state(cfg)
  trained = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(state.params)]
  assert trained and all(".lora_" in name for name in trained), trained[:4]
  length = cfg.train.context_len
  tokens = jax.ShapeDtypeStruct((1, 1, length), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "positions": tokens,
           "weights": jax.ShapeDtypeStruct((1, 1, length), jnp.float32)}
  text = lowered(make_train_step(graphdef, cfg, tx), platform, state, batch)
  assert "xui8>" in text
