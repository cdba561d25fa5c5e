"""Run by tests/test_expert_parallel.py in a child with 8 forced CPU devices: `numerics OUT` or
`training ROOT CACHE OUT`; writes what it measured as JSON to OUT."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from nanogptoss_jax.kernels import expert_parallel
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.moe import dense_experts, swiglu
from nanogptoss_jax.parallel import rules
from nanogptoss_jax.parallel.mesh import make_mesh
from nanogptoss_jax.training.losses import next_token_loss
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.step import on_mesh
from tests.factories import relative_error

MODEL = GptOssConfig(num_hidden_layers=2, num_experts=8, experts_per_token=2, vocab_size=128,
                     hidden_size=32, intermediate_size=32, head_dim=8, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=16, rope_scaling_factor=1.0)
MESHES = {"data2-expert4": dict(expert=4), "fsdp2-expert4": dict(fsdp=2, expert=4)}
CASES = [(name, MESHES[name], capacity) for name, capacity in
         (("data2-expert4", 0.0), ("fsdp2-expert4", 2.0))]


def loss_and_grads(execution: ExecutionConfig, batch, mesh=None, lower: bool = False):
  """(loss, metrics, grads, HLO text, weight specs, ragged collectives in the CUDA and TPU
  lowerings) of next_token_loss, on `mesh` (None: one device)."""
  lowered = {}
  model = GptOss(MODEL, execution=execution, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  run = RunConfig(model=MODEL, execution=execution)
  groups = 1 if mesh is None else mesh.size

  def loss(params, batch):
    return next_token_loss(nnx.merge(graphdef, params, rest), batch, run, groups)

  step = jax.jit(on_mesh(jax.value_and_grad(loss, has_aux=True), mesh))
  if mesh is not None:
    params = jax.device_put(params, rules.model_shardings(mesh, model, params))
    batch = jax.device_put(batch, NamedSharding(mesh, P(rules.BATCH_AXES)))
  if lower:  # the programs a GPU and a TPU would run: the ragged collective
    for platform in ("cuda", "tpu"):
      text = step.trace(params, batch).lower(lowering_platforms=(platform,)).as_text()
      lowered[platform] = text.count("ragged_all_to_all")
  compiled = step.lower(params, batch).compile()
  (value, metrics), grads = compiled(params, batch)
  hlo = compiled.as_text()
  specs = {".".join(map(str, p)): str(v.sharding.spec) for p, v in nnx.to_flat_state(params)
           } if mesh is not None else {}
  return float(value), metrics, grads, hlo, specs, lowered


def numerics(out_path: str) -> None:
  batch = np.asarray(jax.random.randint(jax.random.key(1), (16, 33), 0, MODEL.vocab_size))
  value, _, grads, _, _, _ = loss_and_grads(ExecutionConfig(), batch)
  seen = {}
  # Dropless by construction (0) on one mesh, a capacity that suffices here (2) on the other.
  for name, sizes, capacity in CASES:
      execution = ExecutionConfig(expert_capacity=capacity, **sizes)
      ep_value, metrics, ep_grads, hlo, specs, lowered = loss_and_grads(
          execution, batch, make_mesh(execution), lower=not seen)
      errors = [relative_error(a, b) for a, b in zip(jax.tree.leaves(ep_grads),
                                                      jax.tree.leaves(grads))]
      seen[f"{name}-c{capacity}"] = dict(
          loss=ep_value, single=value, grad_error=max(errors),
          dropped=float(metrics["expert_dropped"]), all_to_all=hlo.count("all-to-all("),
          mlp1=[s for p, s in specs.items() if p.endswith("mlp.mlp1_weight")], ragged=lowered)
  seen["dropping"] = dropping()
  seen["ragged"] = ragged()
  json.dump(seen, open(out_path, "w"))


def dropping() -> dict:
  """The kernel at a small capacity against the dense oracle with the dropped assignments
  (past `slots` in token order, per device and expert) given weight 0, counted in numpy."""
  mesh = make_mesh(ExecutionConfig(expert=8))
  devices, tokens, hidden, inter, per_token, num_experts = 8, 24, 16, 8, 2, 8
  keys = jax.random.split(jax.random.key(3), 8)
  t = jax.random.normal(keys[0], (devices, tokens, hidden))
  # A skewed router: most assignments go to experts 0 and 1, so their slots overflow.
  logits = jax.random.normal(keys[1], (devices, tokens, num_experts)) + jnp.array(
      [3.0, 2.0] + [0.0] * 6)
  top_weights, top_experts = jax.lax.top_k(logits, per_token)
  top_weights = jax.nn.softmax(top_weights, -1)
  weights = (jax.random.normal(keys[2], (num_experts, hidden, 2 * inter)),
             jax.random.normal(keys[3], (num_experts, 2 * inter)),
             jax.random.normal(keys[4], (num_experts, inter, hidden)),
             jax.random.normal(keys[5], (num_experts, hidden)))
  factor = 1.0
  slots = expert_parallel.capacity(tokens, per_token, num_experts, factor)
  activation = lambda h: swiglu(h, 7.0)
  rows, split = NamedSharding(mesh, P(rules.BATCH_AXES)), NamedSharding(mesh, P(rules.EXPERT))
  args = jax.device_put((t, top_experts, top_weights, weights),
                        (rows, rows, rows, (split,) * 4))
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    out, dropped = jax.jit(lambda *a: expert_parallel.exchanged_experts(
        *a, activation=activation, matmul=jnp.matmul, batch_axes=rules.BATCH_AXES,
        expert_axis=rules.EXPERT, capacity_factor=factor))(*args)
  experts_np, kept = np.asarray(top_experts), np.ones(top_experts.shape, bool)
  for device in range(devices):
    used = np.zeros(num_experts, int)
    for token in range(tokens):
      for c in range(per_token):
        e = experts_np[device, token, c]
        kept[device, token, c] = used[e] < slots
        used[e] += 1
  oracle = jax.vmap(lambda t, e, w: dense_experts(t, e, w, weights, activation=activation,
                                                  matmul=jnp.matmul))(
      t, top_experts, jnp.where(kept, top_weights, 0))
  return dict(error=relative_error(out, oracle), dropped=np.asarray(dropped).tolist(),
              expected=(~kept).sum(axis=(1, 2)).tolist(), slots=slots)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all as its docstring's pseudocode, from all_gathers (XLA:CPU has no
  ragged collective): every device reads the slices sent to it from everyone's operand."""
  del recv_sizes  # implied by the senders' sizes
  devices, me = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
  per_device = input_offsets.shape[0] // devices
  everyone = [jax.lax.all_gather(x, axis_name) for x in
              (operand, input_offsets, send_sizes, output_offsets)]
  rows = jnp.arange(output.shape[0])
  result = output
  for source in range(devices):
    data, starts, sizes, targets = (x[source] for x in everyone)
    for j in range(per_device):
      i = me * per_device + j  # source's slice i goes to device i // per_device: me
      inside = (rows >= targets[i]) & (rows < targets[i] + sizes[i])
      picked = data[jnp.clip(starts[i] + rows - targets[i], 0, data.shape[0] - 1)]
      result = jnp.where(inside[:, None], picked, result)
  return result


def ragged() -> dict:
  """The ragged exchange (forced; its collective emulated) against the fixed-slot one at a
  dropless capacity: outputs and gradients."""
  mesh = make_mesh(ExecutionConfig(expert=4))
  devices, tokens, hidden, inter, per_token, num_experts = 8, 12, 16, 8, 2, 8
  keys = jax.random.split(jax.random.key(4), 8)
  t = jax.random.normal(keys[0], (devices, tokens, hidden))
  logits = jax.random.normal(keys[1], (devices, tokens, num_experts))
  top_weights, top_experts = jax.lax.top_k(logits, per_token)
  top_weights = jax.nn.softmax(top_weights, -1)
  weights = tuple(jax.random.normal(k, s) for k, s in zip(keys[2:], (
      (num_experts, hidden, 2 * inter), (num_experts, 2 * inter), (num_experts, inter, hidden),
      (num_experts, hidden))))
  rows, split = NamedSharding(mesh, P(rules.BATCH_AXES)), NamedSharding(mesh, P(rules.EXPERT))
  t, top_experts, top_weights = jax.device_put((t, top_experts, top_weights), rows)
  weights = jax.device_put(weights, (split,) * 4)
  results, native = [], jax.lax.ragged_all_to_all
  jax.lax.ragged_all_to_all = emulated_ragged_all_to_all
  for use_ragged in (True, False):
    def loss(t, weights):
      out, dropped = expert_parallel.exchanged_experts(
          t, top_experts, top_weights, weights, activation=lambda h: swiglu(h, 7.0),
          matmul=jnp.matmul, batch_axes=rules.BATCH_AXES, expert_axis=rules.EXPERT,
          ragged=use_ragged)
      return (out * jnp.cos(out)).sum(), (out, dropped)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      results.append(jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(t, weights))
  jax.lax.ragged_all_to_all = native
  (_, (ours, dropped)), grads = results[0]
  (_, (theirs, _)), want = results[1]
  return dict(error=relative_error(ours, theirs), dropped=int(dropped.sum()),
              grad_error=max(relative_error(a, b) for a, b in zip(jax.tree.leaves(grads),
                                                                  jax.tree.leaves(want))))


def training(root: str, cache: str, out_path: str) -> None:
  """5 steps on data 2 x expert 4, resumed for 5 more on fsdp 2 x expert 4."""
  from nanogptoss_jax.training.loop import Trainer, train
  from test_expert_parallel import losses, tiny_ep_run
  trainer = Trainer(tiny_ep_run(f"{root}/moved", cache, expert=4), progress=False)
  trainer.run(until=5)  # checkpointed at step 5 (ckpt_every)
  trainer.close()
  train(tiny_ep_run(f"{root}/moved", cache, fsdp=2, expert=4), progress=False)
  json.dump({"moved": losses(f"{root}/moved")},
            open(out_path, "w"))


if __name__ == "__main__":
  assert jax.device_count() == 8
  {"numerics": numerics, "training": training}[sys.argv[1]](*sys.argv[2:])
