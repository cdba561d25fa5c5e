"""Layers scanned: one traced body for a (sliding, full) pair of blocks, whatever the depth.

The loop layout keeps one Block per layer (`blocks.{i}.…`): XLA then compiles every layer anew,
and the compile time of a train step grows with depth. The scan layout stacks the parameters of
the even (sliding) layers and of the odd (full) layers along a leading [L/2] axis
(`blocks.pairs.sliding.…`, `blocks.pairs.full.…`), and runs one `lax.scan` over the pairs: the
two kinds of layer differ in their window, which is static, so a pair is the unit that repeats.
An odd last layer (sliding) stays apart (`blocks.last.…`). The windows come from
`GptOssConfig.layer_window` alone (`check_pairs` refuses a rule the pairs cannot hold).

A cached forward (prefill, decode) scans too: the KV caches are stacks per kind of layer
(`kv_cache.StackedCache`), carried through the scan, each layer's new keys scattered into its
entry in place, so neither weights nor caches are copied per layer by Python-side slicing and
compile time stays flat in depth. MXFP4 expert blocks and scales are not sliced per layer at
all: they reach each pair whole, with its index, and the MoE reads one expert of one layer at a
time from them (`mxfp4.Mxfp4Experts.layer`).

Both layouts hold the same numbers, so any state tree converts between them (`to_layout`):
parameters, optimiser moments, abstract shapes for restoring checkpoints.
"""

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanogptoss_jax.model import adapters, axes
from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.model.kv_cache import StackedCache

LOOP, SCAN = "loop", "scan"
BLOCKS, PAIRS, LAST, SLIDING, FULL = "blocks", "pairs", "last", "sliding", "full"
# Expert adapters of some layers only, beside the stacks: `lora_experts.{layer}.lora_mlp1...`.
LORA_EXPERTS = "lora_experts"
# Stacks the scan passes to every pair whole instead of slicing (frozen uint8 expert storage).
WHOLE = ("mlp1_blocks", "mlp1_scales", "mlp2_blocks", "mlp2_scales")


def check_pairs(windows: list[int | None]) -> None:
  """Refuses a window rule (`GptOssConfig.layer_window`, the one place it is written) that the
  pair stacks cannot hold: every pair's sliding layer as wide as layer 0, its full one as
  layer 1; else one traced pair would run some layers with another layer's window."""
  for layer, window in enumerate(windows):
    if window != windows[layer % 2]:
      raise ConfigError(f"the scan layout stacks layers in (sliding, full) pairs, but layer "
                        f"{layer}'s window is {window} and layer {layer % 2}'s "
                        f"{windows[layer % 2]}")


class BlockPair(nnx.Module):
  """A sliding layer and the full layer after it."""

  def __init__(self, sliding: nnx.Module, full: nnx.Module):
    self.sliding, self.full = sliding, full


class ScannedBlocks(nnx.Module):
  """Blocks [L] as pairs stacked along [L/2] (+ the odd last block), applied with `lax.scan`."""

  def __init__(self, blocks: list[nnx.Module]):
    self.num_layers = len(blocks)
    check_pairs([block.attn.window for block in blocks])
    pairs = [BlockPair(blocks[i], blocks[i + 1]) for i in range(0, len(blocks) - 1, 2)]
    self.pairs = (nnx.merge(nnx.graphdef(pairs[0]), _stack([nnx.state(pair) for pair in pairs]))
                  if pairs else None)
    self.last = blocks[-1] if len(blocks) % 2 else None
    # model/lora.py: {str(layer): ExpertAdapters} when some layers' experts are adapted.
    self.lora_experts = nnx.data(None)

  def __len__(self) -> int:
    return self.num_layers

  def __call__(self, x: jax.Array, run: Callable, cache: StackedCache | None = None
               ) -> tuple[jax.Array, StackedCache | None, list]:
    """x through every layer in order, `run(block, x, cache, layer, lora) -> (x, cache, stats)`
    applying one over its entry `layer` of a stacked cache (None without a cache), with `lora`
    the layer's expert adapters when they are held here (else None); returns x, the caches
    (written in place, carried through the scan) and each layer's stats."""
    stats, sliding, full, last = [], None, None, None
    if cache is not None:
      sliding, full, last = cache.sliding, cache.full, cache.last
    if self.pairs is not None:
      graphdef, whole, state = nnx.split(self.pairs, lambda path, _: path[-1] in WHOLE, ...)
      picked = [self._picked_lora(kind) for kind in (0, 1)]

      def lora_of(kind: int, pair_index: jax.Array) -> adapters.PickedExperts | None:
        if picked[kind] is None:
          return None
        base, slots, on = picked[kind]
        return dataclasses.replace(base, slot=slots[pair_index], on=on[pair_index])

      def body(carry, pair_state):
        x, sliding, full, pair_index = carry
        # copy=True: `whole`'s Variables belong to the trace outside the scan, where nnx.remat
        # inside it could not write them back.
        pair = nnx.merge(graphdef, whole, pair_state, copy=True)
        x, sliding, sliding_stats = run(pair.sliding, x, sliding, pair_index,
                                        lora_of(0, pair_index))
        x, full, full_stats = run(pair.full, x, full, pair_index, lora_of(1, pair_index))
        return (x, sliding, full, pair_index + 1), (sliding_stats, full_stats)

      start = (x, sliding, full, jnp.zeros((), jnp.int32))
      (x, sliding, full, _), (sliding_stats, full_stats) = jax.lax.scan(body, start, state)
      for p in range(self.num_layers // 2):
        stats += [jax.tree.map(lambda s: s[p], sliding_stats),
                  jax.tree.map(lambda s: s[p], full_stats)]
    if self.last is not None:
      held = self.lora_experts or {}
      x, last, last_stats = run(self.last, x, last, 0, held.get(str(self.num_layers - 1)))
      stats.append(last_stats)
    return x, None if cache is None else StackedCache(sliding, full, last), stats

  def _picked_lora(self, kind: int) -> tuple | None:
    """For the pairs' layers of `kind` (0 sliding, 1 full) with adapters in `lora_experts`: the
    stacks of their factors as `adapters.PickedExperts` and, per pair, the slot to pick and
    whether its layer has any; None when no layer of that kind has."""
    owners = {int(layer): owner for layer, owner in (self.lora_experts or {}).items()
              if int(layer) % 2 == kind and int(layer) < self.num_layers // 2 * 2}
    if not owners:
      return None
    layers = sorted(owners)
    found = [[adapters.adapter(owners[layer], target) for layer in layers]
             for target in adapters.EXPERT_TARGETS]
    stacks = tuple(None if low_ranks[0] is None else jnp.stack([getattr(low_rank, part)[...]
                                                                for low_rank in low_ranks])
                   for low_ranks in found for part in ("lora_a", "lora_b"))
    scale = next(low_ranks[0].scale for low_ranks in found if low_ranks[0] is not None)
    slots, on = np.zeros(self.num_layers // 2, np.int32), np.zeros(self.num_layers // 2,
                                                                   np.float32)
    for i, layer in enumerate(layers):
      slots[layer // 2], on[layer // 2] = i, 1.0
    return adapters.PickedExperts(stacks, jnp.zeros((), jnp.int32), jnp.ones(()), scale), \
        jnp.asarray(slots), jnp.asarray(on)

  def stacked(self, layer: int) -> tuple[nnx.Module, int | None]:
    """Where layer `layer` lives: (its stack of Blocks, its entry), or (the last Block, None)."""
    if layer == self.num_layers - 1 and self.last is not None:
      return self.last, None
    return (self.pairs.full if layer % 2 else self.pairs.sliding), layer // 2

  def block(self, layer: int) -> nnx.Module:
    """Layer `layer` as a Block of its own (a view: its arrays are slices of the stacks)."""
    stack, entry = self.stacked(layer)
    if entry is None:
      return stack
    graphdef, state = nnx.split(stack)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[entry], state))


def _relabel(tree, stacked: bool):
  """`tree` with the logical names of its Variables gaining (or losing) the LAYERS axis."""
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if isinstance(leaf, nnx.Variable):
      (axes.stacked if stacked else axes.unstacked)(leaf)
  return tree


def _stack(trees: list):
  """Leaves stacked along a new leading axis; works on abstract leaves (ShapeDtypeStruct)."""
  def stack(*leaves):
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)
    return jnp.stack(leaves)
  return _relabel(jax.tree.map(stack, *trees), stacked=True)


def _unstack(tree, count: int) -> list:
  def take(leaf, i):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]
  return [_relabel(jax.tree.map(lambda leaf: take(leaf, i), tree), stacked=False)
          for i in range(count)]


def _is_expert_lora(name) -> bool:
  return isinstance(name, str) and name.startswith("lora_mlp")


def stack_flat(flat: dict, num_layers: int) -> dict:
  """A flat loop-layout state {path: Variable} in the scan layout. Each stack is built as its
  layers leave `flat`, so loading holds one stack beyond the model, not a second model."""
  out, groups = {}, {}
  adapted = {path[1] for path in flat if len(path) > 3 and path[0] == BLOCKS
             and isinstance(path[1], int) and path[2] == "mlp" and _is_expert_lora(path[3])}
  if adapted and len(adapted) < num_layers:
    for path in [p for p in flat if p[1:2] and p[1] in adapted and p[2:3] == ("mlp",)
                 and _is_expert_lora(p[3]) and p[0] == BLOCKS]:
      out[(BLOCKS, LORA_EXPERTS, str(path[1]), *path[3:])] = flat.pop(path)
  for path in list(flat):
    if len(path) > 1 and path[0] == BLOCKS and isinstance(path[1], int):
      layer, rest = path[1], path[2:]
      if num_layers % 2 and layer == num_layers - 1:
        out[(BLOCKS, LAST, *rest)] = flat.pop(path)
      else:
        groups.setdefault((BLOCKS, PAIRS, FULL if layer % 2 else SLIDING, *rest), []).append(path)
    else:
      out[path] = flat.pop(path)
  for target, paths in groups.items():
    out[target] = _stack([flat.pop(path) for path in sorted(paths, key=lambda p: p[1])])
  return out


def layout_of(blocks: Mapping) -> str:
  """The layout of a `blocks` state node: layer numbers (loop) or pairs/last (scan)."""
  return SCAN if set(blocks) & {PAIRS, LAST} else LOOP


def _raw(node: Mapping) -> Mapping:
  # An nnx.State keeps its children as plain dicts and wraps them only when indexed.
  return node.raw_mapping if isinstance(node, nnx.State) else node


def _without_expert_lora(layer: Mapping) -> dict:
  """A layer's node without its expert adapters (and without `mlp` if nothing else is left)."""
  mlp = {k: v for k, v in _raw(layer["mlp"]).items() if not _is_expert_lora(k)}
  return {**{k: v for k, v in _raw(layer).items() if k != "mlp"}, **({"mlp": mlp} if mlp else {})}


def _blocks_to_scan(blocks: Mapping) -> dict:
  num_layers = len(blocks)
  layers = [blocks[i] for i in range(num_layers)]
  node = {}
  # Expert adapters on some layers only cannot stack: they move beside the stacks.
  held = {i: {k: v for k, v in _raw(layer["mlp"]).items() if _is_expert_lora(k)}
          for i, layer in enumerate(layers) if "mlp" in layer}
  held = {i: owned for i, owned in held.items() if owned}
  if held and len(held) < num_layers:
    node[LORA_EXPERTS] = {str(i): owned for i, owned in held.items()}
    layers = [_without_expert_lora(layer) if i in held else layer
              for i, layer in enumerate(layers)]
  if num_layers >= 2:
    pairs = num_layers // 2 * 2
    node[PAIRS] = {SLIDING: _stack(layers[0:pairs:2]), FULL: _stack(layers[1:pairs:2])}
  if num_layers % 2:
    node[LAST] = layers[-1]
  return node


def _blocks_to_loop(blocks: Mapping) -> dict:
  layers = []
  if PAIRS in blocks:
    count = jax.tree.leaves(blocks[PAIRS][SLIDING])[0].shape[0]
    for sliding, full in zip(_unstack(blocks[PAIRS][SLIDING], count),
                             _unstack(blocks[PAIRS][FULL], count)):
      layers += [sliding, full]
  if LAST in blocks:
    layers.append(blocks[LAST])
  for key, held in _raw(blocks.get(LORA_EXPERTS, {})).items():
    layer = _raw(layers[int(key)])
    layers[int(key)] = {**layer, "mlp": {**_raw(layer.get("mlp", {})), **_raw(held)}}
  return dict(enumerate(layers))


def _has_blocks(node) -> bool:
  return isinstance(node, Mapping) and isinstance(node.get(BLOCKS), Mapping)


def to_layout(tree, target: str):
  """`tree` with every `blocks` node (of a model state, optimiser state, abstract or not) in
  the `target` layout, LOOP or SCAN; nodes already in it are left as they are."""
  def convert(node):
    if not _has_blocks(node) or layout_of(node[BLOCKS]) == target:
      return node
    blocks = (_blocks_to_scan if target == SCAN else _blocks_to_loop)(_raw(node)[BLOCKS])
    return type(node)({**_raw(node), BLOCKS: blocks})

  return jax.tree.map(convert, tree, is_leaf=_has_blocks)


def tree_layout(tree) -> str | None:
  """The layout of the first `blocks` node in `tree`, None if it has none."""
  found = []

  def visit(node):
    if _has_blocks(node):
      found.append(layout_of(node[BLOCKS]))
    return node

  jax.tree.map(visit, tree, is_leaf=_has_blocks)
  return found[0] if found else None
