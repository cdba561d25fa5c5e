"""Device memory of one LoRA fine-tuning step at gpt-oss-20b and -120b shapes (XLA's analysis).

Abstract weights (nnx.eval_shape): nothing is allocated, the step is only compiled. One step:
the loss gradient w.r.t. the adapters (r 8 on q, k, v, o and both expert matrices), AdamW's
update, the adapters and moments donated; batch 1 x 2,048 tokens, with the execution settings
of configs/finetune_20b_lora.py (scanned layers, remat per block, chunked loss, experts a block
at a time). QLoRA keeps the experts as published (MXFP4 blocks + scales, decoded in the step); the
comparison row stores them dequantized to bf16. Memory = arguments + outputs - donated aliases
+ temporaries. Compiled for this machine's backend (a CPU here: its buffer assignment, not a
GPU's; run it on a GPU for that GPU's figure).

  python benchmarks/finetune_memory.py [--models 20b,120b] [--formats mxfp4,float] [--length 2048]
"""

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.lora import LoraConfig, add_lora, lora_filter
from nanogptoss_jax.training.config_files import load_config_file
from nanogptoss_jax.training.losses import token_losses

FINETUNE_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune_20b_lora.py"

# The published shapes (their config.json): 120b is GptOssConfig's default.
SHAPES = {"20b": GptOssConfig(num_hidden_layers=24, num_experts=32), "120b": GptOssConfig()}
LORA = LoraConfig(rank=8, alpha=16.0)  # OpenAI's TRL recipe
GB = 1e9


def step_memory(cfg: GptOssConfig, execution: ExecutionConfig, lora: LoraConfig, batch: int,
                length: int) -> dict[str, float]:
  """GB of the frozen weights, the adapters + moments, XLA's temporaries, and the total."""
  model = nnx.eval_shape(lambda: add_lora(GptOss(cfg, execution=execution, rngs=nnx.Rngs(0)),
                                          lora))
  graphdef, params, frozen = nnx.split(model, lora_filter(), ...)
  tx = optax.adamw(2e-4)
  opt_state = jax.eval_shape(tx.init, params)

  def step(params, opt_state, frozen, tokens):
    def loss(params):
      return token_losses(nnx.merge(graphdef, params, frozen), tokens)[0].mean()
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, frozen,
                                                        tokens).compile()
  analysis = compiled.memory_analysis()
  size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
           - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
  return {"weights": size(frozen) / GB, "adapters+adam": (size(params) + size(opt_state)) / GB,
          "temp": analysis.temp_size_in_bytes / GB, "total": total / GB}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--models", default="20b,120b")
  parser.add_argument("--formats", default="mxfp4,float")
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--layers", type=int, default=0, help="0: the model's own depth")
  parser.add_argument("--moe-impl", default="",
                      help="the fine-tune config's unless given: sorted, looped, ragged, dense")
  args = parser.parse_args()
  shipped = load_config_file(FINETUNE_CONFIG).execution
  if args.moe_impl:
    shipped = shipped.replace(moe_impl=args.moe_impl)
  qlora = {}
  for experts in args.formats.split(","):
    for name in args.models.split(","):
      start = time.perf_counter()
      execution = shipped.replace(expert_format=experts)
      cfg = SHAPES[name].replace(num_hidden_layers=args.layers or SHAPES[name].num_hidden_layers)
      memory = step_memory(cfg, execution, LORA, 1, args.length)
      label = "QLoRA (MXFP4 experts)" if experts == "mxfp4" else "LoRA (bf16 experts)"
      print(f"{name:5s} {label:22s} " + " ".join(f"{k} {v:6.2f} GB" for k, v in memory.items())
            + f"  compile {time.perf_counter() - start:5.1f} s", flush=True)
      if experts == "mxfp4":
        qlora[name] = memory["total"]
  if qlora:
    print("QLoRA step memory: " + ", ".join(f"{name} {gb:.1f} GB" for name, gb in qlora.items()))


if __name__ == "__main__":
  main()
