"""Cached decoding past position 4,096 with YaRN on equals the full forward pass.

At these lengths `auto` attention is flash attention (model/choices.py) in the full forward, the
prefill over the cache and (through the plain rule for one query) the decode steps.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax import GptOss, GptOssConfig

REL_TOL = 1e-4
PREFILL, DECODE = 4100, 6  # decode steps run at positions 4100..4105


@nnx.jit
def forward(model, tokens, positions=None, cache=None):
  return model.forward(tokens, positions, cache)


def test_cached_decoding_past_4096_positions_with_yarn_equals_full_forward():
  cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=64,
                     hidden_size=32, intermediate_size=16, head_dim=16, num_attention_heads=4,
                     num_key_value_heads=2, sliding_window=8, rope_scaling_factor=32.0,
                     initial_context_length=256)
  model = GptOss(cfg, rngs=nnx.Rngs(0))
  length = PREFILL + DECODE
  tokens = np.random.default_rng(0).integers(0, 64, (1, length)).astype(np.int32)
  full = forward(model, jnp.asarray(tokens)).logits  # [1, T, V]
  cache = model.init_cache(1, length)
  out = forward(model, jnp.asarray(tokens[:, :PREFILL]), jnp.arange(PREFILL)[None], cache)
  got = [out.logits[:, -1]]
  cache = out.cache
  for position in range(PREFILL, length - 1):
    out = forward(model, jnp.asarray(tokens[:, position:position + 1]),
                  jnp.asarray([[position]]), cache)
    got.append(out.logits[:, -1])
    cache = out.cache
  got = jnp.stack(got, axis=1)  # logits at positions PREFILL-1 .. length-2
  expected = full[:, PREFILL - 1:length - 1]
  error = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
  assert error <= REL_TOL, f"relative error {error:.2e}"
