"""Test helpers (not tests): tiny LoRA models and the dense oracle, ΔW = (alpha / r) A B
materialized and added to the base weights (what LoRA means, written without the factors)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.lora import LoraConfig, add_lora
from tests.factories import tiny_config

# Three layers: the scan layout then has a stacked pair and a lone last block.
CFG = tiny_config(num_hidden_layers=3, vocab_size=64, intermediate_size=32, head_dim=8,
                  sliding_window=4)
LORA = LoraConfig(rank=4, alpha=8.0)
# Five layers: two scanned pairs and a last block; the experts of a full layer (1), a sliding one
# (2) and the last (4) adapted, the others not, so a pair handed another's adapters shows.
FIVE = CFG.replace(num_hidden_layers=5)
SOME = LoraConfig(rank=4, alpha=8.0, expert_layers=(1, 2, 4))


def randomize(model, filter_, seed: int, std: float) -> None:
  """Fills every parameter `filter_` selects with N(0, std), so zero-init parts show."""
  for i, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(model, filter_))):
    key = jax.random.key(seed * 1000 + i)
    variable.set_value(std * jax.random.normal(key, variable.shape, variable.dtype))


def base_model(layers_impl="loop", moe_impl="dense", seed=0, cfg=CFG, **execution):
  model = GptOss(cfg, execution=ExecutionConfig(layers_impl=layers_impl, moe_impl=moe_impl,
                                                 **execution), rngs=nnx.Rngs(seed))
  # Non-zero biases and sinks: a dropped one shows.
  randomize(model, lambda path, _: path[-1] in ("bias", "sinks", "mlp1_bias", "mlp2_bias"),
            seed + 7, 0.1)
  return model


def lora_model(layers_impl="loop", moe_impl="dense", lora=LORA, cfg=CFG, **execution):
  """A base with adapters whose B (zero at init) is random, so the update is not zero."""
  model = add_lora(base_model(layers_impl, moe_impl, cfg=cfg, **execution), lora, seed=1)
  randomize(model, lambda path, _: path[-1] == "lora_b", 3, 0.2)
  return model


# target -> (owner, base weight, slice of the base's output axis or None)
def _base_targets(cfg):
  q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
  return {"lora_q": ("attn", ("qkv", "kernel"), slice(0, q)),
          "lora_k": ("attn", ("qkv", "kernel"), slice(q, q + kv)),
          "lora_v": ("attn", ("qkv", "kernel"), slice(q + kv, q + 2 * kv)),
          "lora_o": ("attn", ("out", "kernel"), None),
          "lora_mlp1": ("mlp", ("mlp1_weight",), None),
          "lora_mlp2": ("mlp", ("mlp2_weight",), None)}


def dense_weights(base_flat: dict, adapters: dict, scale: float, cfg=CFG) -> dict:
  """{path: value} of the base with W += scale * A @ B for every adapter in `adapters`
  ({path of A or B: value}, as the LoRA model's flat state names them)."""
  out = dict(base_flat)
  targets = _base_targets(cfg)
  for path, a in adapters.items():
    if path[-1] != "lora_a":
      continue
    b = adapters[(*path[:-1], "lora_b")]
    owner_at = path.index(path[-2]) - 1  # ... owner, lora_x, lora_a
    _, weight, part = targets[path[-2]]
    weight_path = (*path[:owner_at + 1], *weight)
    delta = scale * jnp.matmul(a, b, precision="highest")  # [.., in, out]
    w = jnp.asarray(out[weight_path])
    out[weight_path] = w + delta if part is None else w.at[..., part].add(delta)
  return out
