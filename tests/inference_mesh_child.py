"""Run by tests/test_inference_mesh.py in a child with 8 forced CPU devices: compiles the serving
engine's decode chunk for a model placed by the rules on several meshes, and writes, per mesh,
every all-gather's operand shape, the weights' shard shapes, and the chunk's tokens (greedy),
as JSON to argv[1]."""

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.parallel import rules
from nanogptoss_jax.parallel.mesh import make_mesh, traced_on
from nanogptoss_jax.serving import engine

# Dimensions chosen apart (width 96, expert width 80, vocab 1,000, 8 experts, heads 8 / 4 x 16)
# so that no activation of the decode step has a weight's shape by accident.
MODEL = GptOssConfig(num_hidden_layers=2, num_experts=8, experts_per_token=2, vocab_size=1000,
                     hidden_size=96, intermediate_size=80, head_dim=16, num_attention_heads=8,
                     num_key_value_heads=4, sliding_window=4, rope_scaling_factor=1.0)
MESHES = {"tensor8": dict(tensor=8), "expert2-tensor4": dict(expert=2, tensor=4)}
SLOTS, CONTEXT = 2, 16
DEFINITION = re.compile(r"%([\w.-]+) = \w+\[([\d,]*)\]")
COLLECTIVE = re.compile(r"= [^=]*? (all-gather|all-reduce|all-to-all)(?:-start)?\(([^)]*)\)")


def decode_chunk(model, mesh=None):
  """(compiled HLO text, tokens [SLOTS, CHUNK], weight shard shapes) of one decode chunk from
  an empty cache, greedy."""
  graphdef, params = nnx.split(model)
  if mesh is not None:
    params = jax.device_put(params, rules.model_shardings(mesh, model, params))
  args = (params, model.init_cache(SLOTS, CONTEXT), jnp.array([5, 801], jnp.int32),
          jnp.zeros(SLOTS, jnp.int32), jnp.ones(SLOTS, bool),
          jax.vmap(jax.random.key)(jnp.arange(SLOTS)), jnp.zeros(SLOTS, jnp.int32),
          jnp.zeros(SLOTS, jnp.float32), jnp.ones(SLOTS, jnp.float32))
  with traced_on(params):
    compiled = engine._decode_jit.lower(graphdef, *args).compile()
    drawn = compiled(*args)[3]
  shards = {tuple(v.sharding.shard_shape(v.shape)) for _, v in nnx.to_flat_state(params)}
  return compiled.as_text(), np.asarray(drawn).tolist(), sorted(shards)


def collective_operands(hlo: str, ops=("all-gather", "all-reduce")) -> list[list[int]]:
  """The shape of every operand of every `ops` instruction in compiled HLO text (operands are
  printed by name: their shapes are read where they are defined)."""
  shapes = {name: [int(d) for d in dims.split(",") if d]
            for name, dims in DEFINITION.findall(hlo)}
  found = []
  for op, operands in COLLECTIVE.findall(hlo):
    if op in ops:
      found += [shapes[name] for name in re.findall(r"%([\w.-]+)", operands) if name in shapes]
  return found


def main(out_path: str) -> None:
  execution = ExecutionConfig(expert_format="float")
  model = GptOss(MODEL, execution=execution, rngs=nnx.Rngs(0))
  seen = {"single": decode_chunk(model)[1]}
  for name, sizes in MESHES.items():
    hlo, drawn, shards = decode_chunk(model, make_mesh(execution.replace(**sizes)))
    seen[name] = dict(operands=collective_operands(hlo), shards=[list(s) for s in shards],
                      drawn=drawn)
  json.dump(seen, open(out_path, "w"))


if __name__ == "__main__":
  assert jax.device_count() == 8
  main(sys.argv[1])
