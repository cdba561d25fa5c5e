"""Device memory of one LoRA fine-tuning step at gpt-oss-20b and -120b shapes (XLA's analysis).

Abstract weights (nnx.eval_shape): nothing is allocated, the step is only compiled. One step:
the loss gradient w.r.t. the adapters (r 8 on q, k, v, o and both expert matrices of the layers
the config picks, or of every layer), AdamW's update, the adapters and moments donated; batch
1 x 2,048 tokens, with the execution settings of configs/finetune_20b_lora.py (scanned layers,
remat per block, chunked loss, experts a block at a time). QLoRA keeps the experts as
published (MXFP4 blocks + scales, decoded in the step); `+int8` also stores the embedding and
attention kernels as int8 (model/int8.py); the `float` row stores the experts dequantized to
bf16. Memory = arguments + outputs - donated aliases + temporaries.

`--target h100` compiles for an NVIDIA H100 without one: XLA:GPU's own buffer assignment,
through JAX's CUDA plugin and a description of the device (benchmarks/targets/h100_sxm.txtpb),
as JAX's deviceless ahead-of-time compilation does. The plugin is not a dependency; put it
beside the project once (the script prints the command if it is missing):

  pip install --target .cache/aot-cuda --no-deps jax-cuda12-plugin==<jax> jax-cuda12-pjrt==<jax>

`--target host` compiles for the backend this process runs on (a CPU: its buffer assignment
keeps float32 copies of bf16 weights that a GPU does not make).

  python benchmarks/finetune_memory.py [--target h100|host] [--models 20b,120b]
      [--formats mxfp4,mxfp4+int8,float] [--length 2048] [--expert-layers config|all|7,15,23]
"""

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_PLUGIN_DIR = ROOT / ".cache" / "aot-cuda"
TARGETS = {"h100": ROOT / "benchmarks" / "targets" / "h100_sxm.txtpb"}


def _prepare_target(target: str) -> None:
  """Before JAX starts: the CUDA plugin importable, JAX itself running on the CPU."""
  if target == "host":
    return
  if CUDA_PLUGIN_DIR.is_dir():
    sys.path.insert(0, str(CUDA_PLUGIN_DIR))
  if importlib.util.find_spec("jax_plugins") is None or \
      importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    from importlib.metadata import version
    jax_version = version("jax")
    sys.exit(f"--target {target} needs JAX's CUDA plugin: pip install --target {CUDA_PLUGIN_DIR} "
             f"--no-deps jax-cuda12-plugin=={jax_version} jax-cuda12-pjrt=={jax_version}")
  os.environ["JAX_PLATFORMS"] = "cpu"  # no GPU here: the plugin only compiles


def _arguments() -> argparse.Namespace:
  parser = argparse.ArgumentParser()
  parser.add_argument("--target", default="h100", choices=["host", *TARGETS])
  parser.add_argument("--models", default="20b,120b")
  parser.add_argument("--formats", default="mxfp4,mxfp4+int8,float",
                      help="expert storage, +int8 for int8 embedding and attention kernels")
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=0, help="0: the model's own depth")
  parser.add_argument("--expert-layers", default="config",
                      help="whose experts get adapters: the fine-tune config's, all, or 7,15,23")
  parser.add_argument("--moe-impl", default="",
                      help="the fine-tune config's unless given: sorted, looped, ragged, dense")
  return parser.parse_args()


ARGS = _arguments()  # parsed before JAX is imported: the target decides how JAX starts
_prepare_target(ARGS.target)

import jax  # noqa: E402 (after the target's plugin is on the path)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from nanogptoss_jax.model.config import GptOssConfig  # noqa: E402
from nanogptoss_jax.model.execution import ExecutionConfig  # noqa: E402
from nanogptoss_jax.model.gptoss import GptOss  # noqa: E402
from nanogptoss_jax.model.lora import LoraConfig, add_lora, lora_filter  # noqa: E402
from nanogptoss_jax.training.config_files import load_config_file  # noqa: E402
from nanogptoss_jax.training.losses import token_losses  # noqa: E402

FINETUNE_CONFIG = ROOT / "configs" / "finetune_20b_lora.py"

# The published shapes (their config.json): 120b is GptOssConfig's default.
SHAPES = {"20b": GptOssConfig(num_hidden_layers=24, num_experts=32), "120b": GptOssConfig()}
GB = 1e9


def target_device(target: str):
  """The device to compile for: this process's first, or a compile-only H100."""
  if target == "host":
    return jax.devices()[0]
  topology = topologies.get_topology_desc(target, "cuda", target_config=TARGETS[target].read_text(),
                                          topology="1x1x1")
  return topology.devices[0]


def step_memory(cfg: GptOssConfig, execution: ExecutionConfig, lora: LoraConfig, batch: int,
                length: int, device) -> dict[str, float]:
  """GB of the frozen weights, the adapters + moments, XLA's temporaries, and the total."""
  model = nnx.eval_shape(lambda: add_lora(GptOss(cfg, execution=execution, rngs=nnx.Rngs(0)),
                                          lora))
  graphdef, params, frozen = nnx.split(model, lora_filter(), ...)
  tx = optax.adamw(2e-4)
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, frozen, tokens):
    def loss(params):
      return token_losses(nnx.merge(graphdef, params, frozen, copy=True), tokens)[0].mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  # Every array on the one target device: the program is lowered and compiled for its platform.
  placed = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array([device]), ("one",)),
                                      jax.sharding.PartitionSpec())
  place = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placed), tree)
  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32, sharding=placed)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(
      place(params), place(opt_state), place(frozen), tokens).compile()
  analysis = compiled.memory_analysis()
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {"weights": size(frozen) / GB, "adapters+adam": (size(params) + size(opt_state)) / GB,
          "temp": analysis.temp_size_in_bytes / GB, "total": total / GB}


def main(args: argparse.Namespace):
  device = target_device(args.target)
  print(f"compiled for: {device.device_kind}", flush=True)
  run = load_config_file(FINETUNE_CONFIG)
  shipped, lora = run.execution, run.lora  # OpenAI's TRL recipe
  if args.expert_layers != "config":
    layers = () if args.expert_layers == "all" else tuple(
        int(x) for x in args.expert_layers.split(","))
    lora = dataclasses.replace(lora, expert_layers=layers)
  print(f"adapters: r {lora.rank} on {', '.join(lora.targets)}; experts of "
        f"{'every layer' if not lora.expert_layers else 'layers ' + str(lora.expert_layers)}")
  # `auto` choices (attention, loss, MoE kernels) for the platform compiled for.
  shipped = shipped.replace(platform="cpu" if args.target == "host" else "gpu")
  if args.moe_impl:
    shipped = shipped.replace(moe_impl=args.moe_impl)
  qlora = {}
  for storage in args.formats.split(","):
    experts, _, dense = storage.partition("+")
    for name in args.models.split(","):
      start = time.perf_counter()
      execution = shipped.replace(expert_format=experts, dense_format=dense or "float")
      cfg = SHAPES[name].replace(num_hidden_layers=args.layers or SHAPES[name].num_hidden_layers)
      if any(layer >= cfg.num_hidden_layers for layer in lora.expert_layers):
        sys.exit(f"--layers {cfg.num_hidden_layers}: the adapted expert layers "
                 f"{lora.expert_layers} do not exist; pass --expert-layers (all, or 0,1)")
      memory = step_memory(cfg, execution, lora, 1, args.length, device)
      label = ("QLoRA (MXFP4 experts)" if experts == "mxfp4" else "LoRA (bf16 experts)") + (
          " + int8" if dense else "")
      print(f"{name:5s} {label:29s} " + " ".join(f"{k} {v:6.2f} GB" for k, v in memory.items())
            + f"  compile {time.perf_counter() - start:5.1f} s", flush=True)
      if storage == "mxfp4":
        qlora[name] = memory["total"]
  if qlora:
    print("QLoRA step memory: " + ", ".join(f"{name} {gb:.1f} GB" for name, gb in qlora.items()))


if __name__ == "__main__":
  main(ARGS)
