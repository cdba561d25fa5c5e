"""load_pretrained: a published checkpoint directory -> (GptOss, tokenizer), tensor by tensor.

Each tensor is read from its memory-mapped file, brought to our layout and dtype on the host,
placed on its sharding, and dropped, so host memory holds about one tensor at a time.
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import axes, mxfp4
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import abstract_loop_model, from_loop_flat_state
from nanogptoss_jax.model.quantize import quantize
from nanogptoss_jax.parallel.mesh import make_mesh
from nanogptoss_jax.parallel.rules import param_spec
from nanogptoss_jax.pretrained import config_map, hub, names
from nanogptoss_jax.pretrained.layout import ORIGINAL, Checkpoint, open_checkpoint
from nanogptoss_jax.pretrained.safetensors_io import CheckpointError
from nanogptoss_jax.pretrained.tokenizer import tokenizer_for

MXFP4_MODES = ("keep", "dequantize")
GB = 1e9
PROGRESS_EVERY_S = 5.0  # seconds between progress lines on stderr


def default_dtype() -> str:
  # bf16 on accelerators; on the CPU float32, as bf16 matmuls measured far slower there.
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def default_mesh(execution: ExecutionConfig):
  """The execution config's mesh over the local devices, or None for a single device. When it
  asks for no split, every device goes on the tensor axis: heads, vocabulary and experts are
  split (a published model is large), and decoding moves activations, never weights."""
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  if execution.fsdp == execution.expert == execution.tensor == 1:
    execution = execution.replace(tensor=len(devices))
  return make_mesh(execution, devices)


def _sharding(mesh, logical: tuple, shape: tuple[int, ...]):
  """The parallel rules' placement of a tensor of `shape` whose axes mean `logical`."""
  if mesh is None:
    return None
  return NamedSharding(mesh, param_spec(logical, shape, dict(mesh.shape)))


class _Progress:
  """`loading: 120/459 tensors, 5.2/13.8 GB, 1.3 GB/s` on stderr, every PROGRESS_EVERY_S."""

  def __init__(self, tensors: int, nbytes: int):
    self.total, self.total_bytes = tensors, nbytes
    self.start = self.last = time.perf_counter()

  def update(self, done: int, nbytes: int) -> None:
    now = time.perf_counter()
    if now - self.last >= PROGRESS_EVERY_S and done < self.total:
      self.last = now
      print(f"loading: {done}/{self.total} tensors, {nbytes / GB:.1f}/"
            f"{self.total_bytes / GB:.1f} GB, {nbytes / GB / (now - self.start):.2f} GB/s",
            file=sys.stderr, flush=True)


def _read(ckpt: Checkpoint, path: tuple, table: dict) -> tuple[np.ndarray, bool, list[str]]:
  """Our parameter `path` as a host array still in its file's dtype, whether its last two axes
  still need swapping into our layout, and the tensor names it used."""
  expert = names.expert_path(path)
  if expert is not None and expert[2] != "weight":  # kept MXFP4 storage, read as is
    layer, matrix, part = expert
    name = names.mxfp4_names(ckpt.layout, layer, matrix)[part == "scales"]
    return ckpt.get(name), False, [name]
  source_names, swap = table[path]
  if expert is not None and not ckpt.has(source_names[0]):  # MXFP4 source, decoded here
    blocks, scales = names.mxfp4_names(ckpt.layout, expert[0], expert[1])
    return mxfp4.decode_numpy(ckpt.get(blocks), ckpt.get(scales)), True, [blocks, scales]
  parts = [ckpt.get(name) for name in source_names]
  value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
  return value, swap, list(source_names)


@functools.partial(jax.jit, static_argnames=("dtype", "swap"))
def _to_layout(value: jax.Array, dtype, swap: bool) -> jax.Array:
  # On the device, not in numpy: the host then never holds a converted copy (bf16 -> f32 is
  # twice the file's bytes), and XLA converts on every core where ml_dtypes uses one.
  value = jnp.swapaxes(value, -1, -2) if swap else value
  return value.astype(dtype)


def read_config(ckpt: Checkpoint) -> dict:
  if ckpt.layout == ORIGINAL:
    return config_map.from_original(ckpt.config)
  return config_map.from_hugging_face(ckpt.config)


def load_pretrained(path: str, *, dtype: str | None = None, mxfp4: str = "keep", mesh=None,
                    layers_impl: str = "loop", execution: ExecutionConfig | None = None):
  """(GptOss, tokenizer) from a directory in OpenAI's original or Hugging Face's layout.

  mxfp4="keep": MXFP4 expert weights stay 4-bit in memory, decoded in the MoE per selected
  expert; "dequantize": float weights in `dtype` (trainable). dtype None: float32 on the CPU,
  bfloat16 elsewhere. layers_impl: "loop" for sampling (a cached decode step over scanned stacks
  measured 1.5x slower), "scan" or "auto" to fine-tune a deep model. `execution`, when given,
  says all of that at once (its expert_format "float" dequantizes). mesh None: the execution
  config's mesh over every local device; weights are placed by the parallel rules, as the
  trainer places them.
  """
  if mxfp4 not in MXFP4_MODES:
    raise UserError(f"mxfp4={mxfp4!r} must be one of {MXFP4_MODES}")
  if execution is not None and execution.dense_format != "float":
    # No checkpoint stores int8 attention: load its floats, then quantize them (model/int8.py).
    model, tokenizer = load_pretrained(path, mesh=mesh,
                                       execution=execution.replace(dense_format="float"))
    return quantize(model, experts=None, dense=execution.dense_format), tokenizer
  path = hub.resolve(path)  # a hub id (owner/name[/folder][@revision]): its fetched files
  start = time.perf_counter()
  ckpt = open_checkpoint(path)
  tokenizer = tokenizer_for(path)
  quantized = ckpt.has(names.mxfp4_names(ckpt.layout, 0, "mlp1")[0])
  if execution is None:
    dtype = dtype or default_dtype()
    execution = ExecutionConfig(dtype=dtype, param_dtype=dtype, layers_impl=layers_impl,
                                expert_format="mxfp4" if mxfp4 == "keep" else "float")
  if not quantized:  # float experts in the file: nothing to keep 4-bit
    execution = execution.replace(expert_format="float")
  dtype = execution.param_dtype
  fields = read_config(ckpt)
  vocab = fields.get("vocab_size", tokenizer.vocab_size)
  if vocab != tokenizer.vocab_size:  # a test-sized model: its ids are a prefix of the tokenizer's
    print(f"note: vocab_size={vocab} differs from the tokenizer's {tokenizer.vocab_size}",
          file=sys.stderr)
  try:
    cfg = config_map.to_config(fields, stop_tokens=tuple(t for t in tokenizer.stop_ids
                                                         if t < vocab))
  except UserError as e:
    raise CheckpointError(f"{path}/config.json: {e}") from None
  mesh = default_mesh(execution) if mesh is None else mesh
  abstract = abstract_loop_model(cfg, execution)
  logical = axes.axes_by_path(abstract)
  flat = dict(nnx.to_flat_state(nnx.state(abstract)))
  table = names.float_table(ckpt.layout, cfg.num_hidden_layers)
  used, nbytes = set(), 0
  progress = _Progress(len(flat), sum(int(np.prod(v.shape)) * jnp.dtype(
      v.dtype if v.dtype == jnp.uint8 else dtype).itemsize for v in flat.values()))
  for done, (path_, variable) in enumerate(flat.items(), 1):
    target = variable.dtype if variable.dtype == jnp.uint8 else jnp.dtype(dtype)
    value, swap, sources = _read(ckpt, path_, table)
    shape = value.shape[:-2] + value.shape[:-3:-1] if swap else value.shape
    if shape != variable.shape:
      raise CheckpointError(f"tensor {' + '.join(sources)} has shape {shape} in our layout;"
                            f" the config needs {variable.shape}")
    used.update(sources)
    names_ = logical[tuple(path_)]
    # Placed as read (before the swap into our layout), so the host never holds a copy.
    file_names = names_[:-2] + names_[:-3:-1] if swap else names_
    array = jax.device_put(value, _sharding(mesh, file_names, value.shape))
    del value  # a memory-mapped view or a decoded copy; the device holds the tensor now
    if swap or array.dtype != target:
      array = _to_layout(array, target, swap)
      if mesh is not None:  # after a swap the axis to split may be another; a no-op if not
        array = jax.device_put(array, _sharding(mesh, names_, array.shape))
    nbytes += array.nbytes
    variable.set_value(array)
    progress.update(done, nbytes)
  unexpected = sorted(set(ckpt.files) - used)
  if unexpected:
    raise CheckpointError(f"{path} holds {len(unexpected)} tensors the config has no place for,"
                          f" e.g. {unexpected[0]} (is num_hidden_layers right?)")
  seconds = time.perf_counter() - start
  print(f"loaded {len(flat)} tensors, {nbytes / GB:.2f} GB ({ckpt.layout}, "
        f"experts {execution.expert_format}) in {seconds:.1f} s, "
        f"{nbytes / GB / max(seconds, 1e-9):.2f} GB/s", file=sys.stderr)
  return from_loop_flat_state(cfg, execution, flat), tokenizer


def model_bytes(model) -> int:
  """Bytes of a model's weights (works on an `nnx.eval_shape` model)."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves)
