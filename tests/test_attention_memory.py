"""A train step's temporary memory grows about linearly with the context (flash attention under
`auto` from 1k tokens on), not with its square as saved softmax probabilities would.

XLA's own analysis of the compiled loss gradient, on abstract parameters: nothing runs. 8k is
left to benchmarks/attention_memory.py (compile time); docs/benchmarks.md has the table.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax import GptOss, GptOssConfig
from nanogptoss_jax.training.losses import token_losses

GROWTH_PER_DOUBLING = 2.3
# configs/nano.py's layer shapes, two layers.
NANO_2 = GptOssConfig(num_hidden_layers=2, hidden_size=256, head_dim=64, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, experts_per_token=2,
                      intermediate_size=256, sliding_window=128, rope_theta=150000.0,
                      rope_scaling_factor=1.0, vocab_size=4096)


def temp_bytes(cfg, batch: int, length: int) -> int:
  """XLA's temporary bytes for the loss gradient of `cfg` at [batch, length] tokens."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GptOss(cfg, rngs=nnx.Rngs(0))))

  def loss(state, tokens):
    return token_losses(nnx.merge(graphdef, state), tokens)[0].mean()

  tokens = jax.ShapeDtypeStruct((batch, length + 1), jnp.int32)
  return jax.jit(jax.grad(loss)).lower(state, tokens).compile().memory_analysis().temp_size_in_bytes


def test_train_step_memory_grows_linearly_with_context():
  sizes = [temp_bytes(NANO_2, 1, length) for length in (1024, 2048, 4096)]
  for shorter, longer in zip(sizes, sizes[1:]):
    assert longer <= GROWTH_PER_DOUBLING * shorter, [s / 2**20 for s in sizes]
