"""The GPT-OSS transformer in Flax NNX (same math as OpenAI's `gpt_oss.torch.model`, batched)."""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.model import axes, choices, int8
from nanogptoss_jax.model.attention import Attention
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.kv_cache import LayerCache, StackedCache, empty_cache
from nanogptoss_jax.model.layer_stack import LOOP, SCAN, ScannedBlocks, stack_flat
from nanogptoss_jax.model.layers import RMSNorm, normal_init
from nanogptoss_jax.model.moe import MoE
from nanogptoss_jax.model.output import ModelOutput, default_positions
from nanogptoss_jax.model.params import count_params, param_size
from nanogptoss_jax.model.rope import rope_tables, rope_tables_in_order
from nanogptoss_jax.model.unembedding import Unembedding

# The parameters that exist once per expert, stacked along a leading [E] axis.
EXPERT_PARAMS = ("mlp1_weight", "mlp1_bias", "mlp2_weight", "mlp2_bias", "mlp1_blocks",
                 "mlp1_scales", "mlp2_blocks", "mlp2_scales")


class Block(nnx.Module):
  """Pre-norm residual block: attention (sliding on even layers) then the MoE MLP."""

  def __init__(self, cfg: GptOssConfig, layer: int, *, execution: ExecutionConfig,
               rngs: nnx.Rngs):
    self.attn = Attention(cfg, layer, execution=execution, rngs=rngs)
    self.mlp = MoE(cfg, execution=execution, rngs=rngs)

  def __call__(self, x, positions, rope, cache=None, layer=None, expert_lora=None, *,
               in_order=False, moe_groups=1):
    attn_out, cache = self.attn(x, positions, rope, cache, layer, in_order=in_order)
    x = x + attn_out
    mlp_out, stats = self.mlp(x, groups=moe_groups, layer=layer, lora=expert_lora)
    return x + mlp_out, cache, stats


class GptOss(nnx.Module):
  """Token ids [B, T] -> logits [B, T, V]; `cfg` says what it computes, `execution` how."""

  def __init__(self, cfg: GptOssConfig, *, execution: ExecutionConfig | None = None,
               rngs: nnx.Rngs):
    execution = execution or ExecutionConfig()
    self.cfg, self.execution = cfg, execution
    if execution.dense_format == "int8":  # a frozen int8 table (model/int8.py)
      self.embedding = int8.Int8Embed(cfg.vocab_size, cfg.hidden_size,
                                      dtype=execution.compute_dtype)
    else:
      self.embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=execution.compute_dtype,
                                 param_dtype=execution.storage_dtype, embedding_init=normal_init(),
                                 embedding_metadata=axes.names(axes.VOCAB, axes.EMBED),
                                 rngs=rngs)
    blocks = [Block(cfg, layer, execution=execution, rngs=rngs)
              for layer in range(cfg.num_hidden_layers)]
    # Either layout starts from the same numbers: a seed gives one model, scanned or not.
    self.blocks = (ScannedBlocks(blocks) if layer_layout(cfg, execution) == SCAN
                   else nnx.List(blocks))
    self.norm = RMSNorm(cfg.hidden_size, param_dtype=execution.param_dtype, rngs=rngs)
    self.unembedding = Unembedding(cfg.hidden_size, cfg.vocab_size, dtype=execution.dtype,
                                   param_dtype=execution.param_dtype,
                                   loss_impl=execution.loss_impl, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.forward(tokens).logits

  def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
              cache: list[LayerCache] | StackedCache | None = None, *, unembed: bool = True,
              moe_groups: int = 1) -> ModelOutput:
    """Logits for tokens [B, T] at `positions` [B, T] (default 0..T-1; negative = padding).

    `moe_groups`: the MoE routes tokens within that many equal slices of the batch (one per
    device the batch is split over)."""
    in_order = positions is None  # then attention may skip key blocks that follow the queries
    if in_order:
      positions = default_positions(tokens)
    # Shared by every layer; with implied positions every row has the same table: [1, T, H/2].
    rope = (rope_tables_in_order(self.cfg, tokens.shape[1]) if in_order
            else rope_tables(self.cfg, positions))
    x = self.embedding(tokens)  # [B, T, D]
    run = self._block(in_order, moe_groups)
    if isinstance(self.blocks, ScannedBlocks):
      # One traced pair of layers, whatever the depth; the caches are stacks the scan carries.
      x, new_cache, stats = self.blocks(
          x, lambda block, x, cache, layer, lora: run(block, x, positions, rope, cache, layer,
                                                      lora), cache)
    else:
      new_cache, stats = [], []
      for layer in range(self.cfg.num_hidden_layers):
        x, layer_cache, layer_stats = run(self.blocks[layer], x, positions, rope,
                                          None if cache is None else cache[layer])
        new_cache.append(layer_cache)
        stats.append(layer_stats)
    hidden = self.norm(x)
    logits = self.unembedding(hidden) if unembed else None  # [B, T, V] float32
    aux = jax.tree.map(lambda *xs: jnp.stack(xs), *stats)
    return ModelOutput(logits=logits, hidden=hidden, cache=None if cache is None else new_cache,
                       aux=aux)

  def _block(self, in_order: bool, moe_groups: int):
    """`run(block, *args)` applying a block, or under the execution's `remat` a version whose
    backward pass recomputes it."""
    options = dict(in_order=in_order, moe_groups=moe_groups)
    if self.execution.remat == "none":
      return lambda block, *args: block(*args, **options)
    policy = (jax.checkpoint_policies.save_only_these_names(choices.MATMUL_OUTPUT)
              if self.execution.remat == "matmuls" else None)
    return nnx.remat(lambda block, *args: block(*args, **options), policy=policy)

  def block(self, layer: int) -> Block:
    """Block `layer` (in the scan layout a view whose arrays are slices of the stacks)."""
    if isinstance(self.blocks, ScannedBlocks):
      return self.blocks.block(layer)
    return self.blocks[layer]

  def init_cache(self, batch: int, max_length: int) -> list[LayerCache] | StackedCache:
    """An empty cache for `max_length` positions; sliding layers keep only a window-sized ring.
    A list of layer caches in the loop layout, stacks per kind of layer in the scan layout."""
    cfg = self.cfg

    def empty(layer: int, layers: tuple[int, ...] = ()) -> LayerCache:
      slots = min(cfg.layer_window(layer) or max_length, max_length)
      return empty_cache(batch, slots, cfg.num_key_value_heads, cfg.head_dim,
                         self.execution.compute_dtype, layers)

    if not isinstance(self.blocks, ScannedBlocks):
      return [empty(layer) for layer in range(cfg.num_hidden_layers)]
    pairs, odd = divmod(cfg.num_hidden_layers, 2)
    return StackedCache(sliding=empty(0, (pairs,)) if pairs else None,
                        full=empty(1, (pairs,)) if pairs else None,
                        last=empty(cfg.num_hidden_layers - 1, (1,)) if odd else None)

  def param_counts(self) -> dict[str, int]:
    """{"total": all parameters, "active": those one token's forward pass uses}.

    Works on an abstract model (`nnx.eval_shape`). Active counts the embedding and unembedding
    in full, as every non-expert parameter; OpenAI's model card leaves the embedding table out
    of its "active" figure (3.6B for gpt-oss-20b); ours is that plus vocab_size * hidden_size.
    """
    total = count_params(self)
    # MXFP4 storage counts its stored elements (a byte holds two weights).
    experts = sum(param_size(variable) for path, variable in nnx.to_flat_state(nnx.state(self))
                  if "mlp" in path and path[-1] in EXPERT_PARAMS)
    unused = self.cfg.num_experts - self.cfg.experts_per_token
    return {"total": total, "active": total - experts * unused // self.cfg.num_experts}


def layer_layout(cfg: GptOssConfig, execution: ExecutionConfig) -> str:
  """How the blocks are stored and run: LOOP or SCAN (model/layer_stack.py)."""
  return choices.layers_impl(execution.layers_impl, cfg.num_hidden_layers)


def abstract_loop_model(cfg: GptOssConfig, execution: ExecutionConfig) -> GptOss:
  """The model with one Block per layer, shapes only: what loaders fill tensor by tensor."""
  loop = execution.replace(layers_impl=LOOP)
  return nnx.eval_shape(lambda: GptOss(cfg, execution=loop, rngs=nnx.Rngs(0)))


def from_loop_flat_state(cfg: GptOssConfig, execution: ExecutionConfig, flat: dict) -> GptOss:
  """The model (in the execution's layer layout) from a filled flat state of
  `abstract_loop_model`."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: GptOss(cfg, execution=execution,
                                                        rngs=nnx.Rngs(0))))
  if layer_layout(cfg, execution) == SCAN:
    flat = stack_flat(flat, cfg.num_hidden_layers)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
