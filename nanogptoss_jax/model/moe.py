"""Mixture-of-experts MLP: a router picks each token's top-k experts, a softmax over their
logits weighs them, and each expert is a clamped SwiGLU MLP with biases.

`dense_experts` below is the plain math (every expert on every token, combined with zero weight
off the top-k); the sparse dispatches that cost O(experts_per_token) live in
`kernels/moe_dispatch.py`, picked by the config's `moe_impl` (`model/choices.py`).
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.kernels import moe_dispatch
from nanogptoss_jax.model import adapters, axes, choices, mxfp4
from nanogptoss_jax.model.config import ConfigError, GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.expert_parallel import expert_mode, parallel_experts
from nanogptoss_jax.model.layers import RMSNorm, linear, matmul_for, normal_init, residual_init

SWIGLU_ALPHA = 1.702


def swiglu(h: jax.Array, limit: float) -> jax.Array:
  """The reference's clamped SwiGLU on interleaved channels [..., 2F] -> [..., F]."""
  gate, linear_part = h[..., ::2], h[..., 1::2]  # the SwiGLU's gate (not the MoE's router)
  # Clamping keeps rare huge activations from blowing up (gate only from above, since
  # gate * sigmoid(gate) is already ~0 for very negative gates).
  gate = jnp.minimum(gate, limit)
  linear_part = jnp.clip(linear_part, -limit, limit)
  # `linear + 1`: the reference's extra bias of one on the linear branch.
  return gate * jax.nn.sigmoid(SWIGLU_ALPHA * gate) * (linear_part + 1)


def route(logits: jax.Array, experts_per_token: int) -> tuple[jax.Array, jax.Array]:
  """Router logits [..., E] -> (top experts [..., C], their weights [..., C]).

  The softmax runs over the C chosen logits only, so a token's weights sum to one.
  """
  top_logits, top_experts = jax.lax.top_k(logits, experts_per_token)
  return top_experts, jax.nn.softmax(top_logits, axis=-1)


def dense_experts(t, top_experts, top_weights, weights, adapters=None, *, activation,
                  matmul) -> jax.Array:
  """Every expert on every token t [M, D], combined with zero weight off the top-k -> [M, D];
  `adapters`: LoRA factors or None (kernels/moe_dispatch.sorted_experts)."""
  w1, b1, w2, b2 = weights
  a1, u1, a2, u2 = adapters or (None,) * 4
  num_experts = w1.shape[0]
  # Experts as a batch axis of both operands: each expert's [D, 2F] slice feeds a plain
  # matmul where it lies (contracting x with [E, D, 2F] directly transposes a weight copy).
  t = jnp.broadcast_to(t, (num_experts, *t.shape))  # [E, M, D]
  h = moe_dispatch.with_update(matmul(t, w1) + b1[:, None], t, a1, u1, matmul)  # [E, M, 2F]
  g = activation(h)  # [E, M, F]
  y = moe_dispatch.with_update(matmul(g, w2) + b2[:, None], g, a2, u2, matmul)  # [E, M, D]
  rows = jnp.arange(t.shape[1])[:, None]
  combine = jnp.zeros((t.shape[1], num_experts), jnp.float32)
  combine = combine.at[rows, top_experts].set(top_weights)  # [M, E]
  return jnp.einsum("emd,me->md", y.astype(jnp.float32), combine)


EXPERT_FUNCTIONS = {"dense": dense_experts, "sorted": moe_dispatch.sorted_experts,
                    "looped": moe_dispatch.looped_experts, "ragged": moe_dispatch.ragged_experts}


class MoE(nnx.Module):
  """GPT-OSS MLP block: RMSNorm, router with bias, top-k softmax, SwiGLU experts with biases."""

  def __init__(self, cfg: GptOssConfig, *, execution: ExecutionConfig | None = None,
               rngs: nnx.Rngs):
    execution = execution or ExecutionConfig()
    self.cfg, self.execution = cfg, execution
    param_dtype = execution.storage_dtype
    experts, hidden, inter = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    self.norm = RMSNorm(hidden, param_dtype=execution.param_dtype, rngs=rngs)
    # The router runs in float32 whatever the compute dtype: top-k on bf16 logits ties often.
    self.router = linear(hidden, experts, logical_axes=(axes.EMBED, axes.ROUTER),
                         matmul_impl=execution.matmul_impl, dtype=jnp.float32,
                         param_dtype=param_dtype, kernel_init=normal_init(), rngs=rngs)
    # Layouts are [E, in, out] (the reference stores [E, out, in]); mlp1's 2F output channels
    # interleave the SwiGLU's gate and linear units, as in the reference.
    if execution.expert_format == "mxfp4":  # loaded from a checkpoint; [E, out, in/32, 16] + scales
      if hidden % mxfp4.VALUES_PER_BLOCK or inter % mxfp4.VALUES_PER_BLOCK:
        raise ConfigError(f"MXFP4 experts need hidden_size and intermediate_size divisible by "
                          f"{mxfp4.VALUES_PER_BLOCK} (got {hidden}, {inter})")
      self.mlp1_blocks, self.mlp1_scales = mxfp4_params(experts, 2 * inter, hidden,
                                                        (axes.EXPERT_MLP, axes.EMBED))
      self.mlp2_blocks, self.mlp2_scales = mxfp4_params(experts, hidden, inter,
                                                        (axes.EMBED, axes.EXPERT_MLP))
    else:
      self.mlp1_weight = nnx.Param(
          normal_init()(rngs.params(), (experts, hidden, 2 * inter), param_dtype),
          **axes.names(axes.EXPERTS, axes.EMBED, axes.EXPERT_MLP))
      self.mlp2_weight = nnx.Param(residual_init(cfg.num_hidden_layers)(
          rngs.params(), (experts, inter, hidden), param_dtype),
          **axes.names(axes.EXPERTS, axes.EXPERT_MLP, axes.EMBED))
    self.mlp1_bias = nnx.Param(jnp.zeros((experts, 2 * inter), param_dtype),
                               **axes.names(axes.EXPERTS, axes.EXPERT_MLP))
    self.mlp2_bias = nnx.Param(jnp.zeros((experts, hidden), param_dtype),
                               **axes.names(axes.EXPERTS, axes.EMBED))
    self.dtype = execution.compute_dtype

  def __call__(self, x: jax.Array, *, groups: int = 1, impl: str | None = None,
               layer: jax.Array | None = None, lora: nnx.Module | None = None
               ) -> tuple[jax.Array, dict]:
    """x [B, T, D] -> (MLP output [B, T, D], router statistics for the auxiliary losses).

    Tokens reach experts within `groups` equal slices of the batch: with the batch split over
    P devices, P groups let each device sort and multiply its own tokens. `layer`: the scanned
    pair this block runs, which MXFP4 stacks that reach it whole are read at (`expert_weights`).
    `lora`: a module holding this layer's expert adapters when the MoE does not hold them itself
    (`adapters.ExpertAdapters`, in the scan layout).
    """
    batch, length, hidden = x.shape
    if batch % groups:
      raise ValueError(f"MoE groups={groups} must divide the batch size {batch}")
    t = self.norm(x).reshape(groups, batch * length // groups, hidden)  # [P, M, D]
    logits = self.router(t.astype(jnp.float32))  # [P, M, E]
    top_experts, top_weights = route(logits, self.cfg.experts_per_token)  # [P, M, C]
    # One expert's two matrices (D x 2F and F x D) in the compute dtype.
    expert_bytes = 3 * hidden * self.cfg.intermediate_size * jnp.dtype(self.dtype).itemsize
    impl = choices.moe_impl(impl or self.execution.moe_impl, t.shape[1], self.cfg.num_experts,
                            self.cfg.experts_per_token, expert_bytes)
    options = dict(activation=functools.partial(swiglu, limit=self.cfg.swiglu_limit))
    if impl != "ragged":
      options["matmul"] = matmul_for(self.execution.matmul_impl)
    expert_fn = functools.partial(EXPERT_FUNCTIONS[impl], **options)
    # On a mesh with an expert (or tensor) axis the experts are split over devices and tokens
    # travel to them (model/expert_parallel.py); elsewhere every group sees every expert.
    mode = expert_mode(jax.sharding.get_abstract_mesh(), groups, self.cfg.num_experts)
    # LoRA's low-rank factors, or None.
    lora = adapters.expert_factors(self if lora is None else lora, self.dtype)
    dropped = None
    if mode is not None:
      if lora is not None:
        raise ConfigError("LoRA on the experts (targets mlp1/mlp2) does not run split over an "
                          "expert or tensor mesh axis yet: set execution.expert=1 and "
                          "execution.tensor=1, or leave mlp1 and mlp2 out of lora.targets")
      out, dropped = parallel_experts(mode, self, t.astype(self.dtype), top_experts,
                                      top_weights, options, layer)
    else:
      weights = self.expert_weights(impl, t.shape[1], layer)
      weight_axis = None
      if impl == "ragged":
        # ragged_dot's batching rule wants every operand batched along axis 0.
        weights, lora = jax.tree.map(lambda w: jnp.broadcast_to(w, (groups, *w.shape)),
                                     (weights, lora))
        weight_axis = 0
      out = jax.vmap(expert_fn, in_axes=(0, 0, 0, weight_axis, weight_axis))(
          t.astype(self.dtype), top_experts, top_weights, weights, lora)  # [P, M, D]
    num_experts, per_token = logits.shape[-1], top_experts.shape[-1]
    stats = router_stats(logits.reshape(-1, num_experts), top_experts.reshape(-1, per_token))
    if dropped is not None:
      stats["expert_dropped"] = dropped.sum() / top_experts.size  # fraction of assignments
    return out.reshape(batch, length, hidden).astype(x.dtype), stats

  def expert_weights(self, impl: str, tokens: int, layer: jax.Array | None = None) -> tuple:
    """(w1 [E, D, 2F], b1 [E, 2F], w2 [E, F, D], b2 [E, D]) in the compute dtype.

    MXFP4 matrices come as `Mxfp4Experts`, which the sorted dispatch indexes by the experts its
    blocks select, so a decode step decodes only those, and the looped one by its current
    block's expert; elsewhere every expert is decoded once. In the scan layout the blocks and
    scales arrive as the stacks of every pair ([L/2, E, ...], model/layer_stack.py), read at
    `layer` expert by expert.
    """
    b1, b2 = self.mlp1_bias[...].astype(self.dtype), self.mlp2_bias[...].astype(self.dtype)
    if self.execution.expert_format != "mxfp4":
      return (self.mlp1_weight[...].astype(self.dtype), b1,
              self.mlp2_weight[...].astype(self.dtype), b2)
    decode = choices.mxfp4_decode(self.execution.mxfp4_impl)
    stacked = self.mlp1_blocks[...].ndim == 5
    if stacked and layer is None:
      raise ValueError("MoE: stacked MXFP4 experts need the layer to read")
    w1, w2 = (mxfp4.Mxfp4Experts(blocks[...], scales[...], decode, self.dtype,
                                 layer if stacked else None) for blocks, scales
              in ((self.mlp1_blocks, self.mlp1_scales), (self.mlp2_blocks, self.mlp2_scales)))
    if impl == "looped":
      return w1, b1, w2, b2
    if impl != "sorted" or not choices.decode_selected(tokens, self.cfg.num_experts,
                                                        self.cfg.experts_per_token):
      w1, w2 = w1.dequantize(), w2.dequantize()
    return w1, b1, w2, b2


def mxfp4_params(experts: int, out_features: int, in_features: int,
                 logical_axes: tuple[str, str]) -> tuple[nnx.Param, nnx.Param]:
  """Zeroed MXFP4 storage for [E, out, in] (a loader fills it): blocks and biased exponents;
  `logical_axes` names (out, in), the input axis counted in blocks of 32."""
  groups = in_features // mxfp4.VALUES_PER_BLOCK
  blocks = jnp.zeros((experts, out_features, groups, mxfp4.BYTES_PER_BLOCK), jnp.uint8)
  scales = jnp.full((experts, out_features, groups), mxfp4.SCALE_BIAS, jnp.uint8)
  return (nnx.Param(blocks, **axes.names(axes.EXPERTS, *logical_axes, axes.PACKED)),
          nnx.Param(scales, **axes.names(axes.EXPERTS, *logical_axes)))


def router_stats(logits: jax.Array, top_experts: jax.Array) -> dict:
  """Per-layer load-balancing (Switch) and z-loss (ST-MoE) terms, and each expert's load."""
  num_experts = logits.shape[-1]
  probs = jax.nn.softmax(logits, axis=-1)  # [M, E]
  load = jnp.bincount(top_experts.reshape(-1), length=num_experts) / top_experts.size  # [E]
  return {
      # E * sum_e (fraction of assignments to e) * (mean router probability of e); 1 when even.
      "load_balance_loss": num_experts * jnp.sum(jax.lax.stop_gradient(load) * probs.mean(0)),
      "router_z_loss": jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2),
      "expert_load": load,
  }
