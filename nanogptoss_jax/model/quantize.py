"""Quantize a trained GPT-OSS: float expert matrices to OpenAI's MXFP4 (model/mxfp4.quantize),
and optionally the token embedding and attention's kernels to weight-only int8 (model/int8.py).

By default only the experts change (they hold nearly all the weights of a mixture of experts);
attention, router, norms, embeddings and the expert biases keep their dtype, as in the
published gpt-oss checkpoints. The result is the model a loader builds with MXFP4 experts kept:
it serves, and `save_pretrained` writes it in Hugging Face's MXFP4 layout. `dense="int8"`
shrinks the frozen rest for LoRA fine-tuning and serving (not an exportable format).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import int8, mxfp4
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.model.params import param_bytes

EXPERT_FORMATS = ("mxfp4",)
DENSE_FORMATS = ("int8",)
# Each float expert matrix [E, in, out] and the MXFP4 storage that replaces it.
MXFP4_STORAGE = {"mlp1_weight": ("mlp1_blocks", "mlp1_scales"),
                 "mlp2_weight": ("mlp2_blocks", "mlp2_scales")}
STORAGE_SOURCE = {part: (weight, i) for weight, parts in MXFP4_STORAGE.items()
                  for i, part in enumerate(parts)}


def expert_format(model: GptOss) -> str:
  """How `model` stores its experts: "float" or "mxfp4"."""
  return getattr(model, "execution", model.cfg).expert_format


def _abstract_twin(model: GptOss, **storage) -> GptOss:
  """`model`'s architecture and run settings with its storage changed (`expert_format`,
  `dense_format`), shapes only. Models built before the ExecutionConfig split carry
  `expert_format` on their `cfg` (and no dense format)."""
  execution = getattr(model, "execution", None)
  if execution is None:
    cfg = model.cfg.replace(expert_format=storage.get("expert_format", model.cfg.expert_format))
    return nnx.eval_shape(lambda: GptOss(cfg, rngs=nnx.Rngs(0)))
  execution = execution.replace(**storage)
  return nnx.eval_shape(lambda: GptOss(model.cfg, execution=execution, rngs=nnx.Rngs(0)))


def quantize(model: GptOss, experts: str | None = "mxfp4", dense: str | None = None) -> GptOss:
  """`model` with its expert matrices in MXFP4 (blocks of 32 input values, one power-of-two
  scale each) and, with `dense="int8"`, its token embedding and attention kernels in int8 (a
  scale per output channel); None leaves that part as it is, and so does asking for the format
  it has already (a model quantized both ways comes back as it is)."""
  if experts not in (*EXPERT_FORMATS, None):
    raise UserError(f"quantize(experts={experts!r}): the supported formats are {EXPERT_FORMATS}")
  if dense not in (*DENSE_FORMATS, None):
    raise UserError(f"quantize(dense={dense!r}): the supported formats are {DENSE_FORMATS}")
  if not isinstance(model, GptOss):
    raise UserError(f"quantize needs a GPT-OSS model (its experts are what is quantized); got "
                    f"{type(model).__name__}")
  storage = {}
  if experts is not None and expert_format(model) != experts:
    storage["expert_format"] = experts
  if dense is not None and getattr(model, "execution", None) is None:
    raise UserError("quantize(dense=...) needs a model built with an ExecutionConfig")
  if dense is not None and model.execution.dense_format != dense:
    storage["dense_format"] = dense
  if not storage:
    return model
  source = dict(nnx.to_flat_state(nnx.state(model)))
  target = _abstract_twin(model, **storage)
  flat = dict(nnx.to_flat_state(nnx.state(target)))
  converted = {p for p, v in flat.items() if p in source and v.dtype != source[p].dtype
               and p[-1] in (*MXFP4_STORAGE, *int8.STORAGE)} | {
      (*p[:-1], STORAGE_SOURCE[p[-1]][0]) for p in flat if p[-1] in STORAGE_SOURCE
      and p not in source}
  if not all(bool(jnp.isfinite(source[path][...]).all()) for path in converted):
    raise UserError("quantize: the weights to quantize hold NaN or Inf; they cannot be stored "
                    "so (train or load a healthy checkpoint first)")
  quantized = {}  # each float matrix once: its blocks and scales come from one quantize call
  int8_scales = {scale: (name, axis) for name, (scale, axis) in int8.STORAGE.items()}
  for path, variable in flat.items():
    if path[-1] in STORAGE_SOURCE and path not in source:
      weight, part = STORAGE_SOURCE[path[-1]]
      weight_path = (*path[:-1], weight)
      if weight_path not in quantized:
        # Ours are [..., E, in, out]; MXFP4 blocks run along `in`, stored [..., E, out, in/32, 16].
        quantized[weight_path] = mxfp4.quantize(jnp.swapaxes(source[weight_path][...], -1, -2))
      variable.set_value(quantized[weight_path][part])
    elif path in converted or (path[-1] in int8_scales and path not in source):
      name, axis = (path[-1], int8.STORAGE[path[-1]][1]) if path in converted else \
          int8_scales[path[-1]]
      matrix = (*path[:-1], name)
      if matrix not in quantized:
        quantized[matrix] = int8.quantize(source[matrix][...], axis)
      variable.set_value(quantized[matrix][0 if path[-1] == name else 1])
    else:
      variable.set_value(source[path][...])
  return nnx.merge(nnx.graphdef(target), nnx.from_flat_state(flat))


def expert_bytes(model: GptOss) -> int:
  """Bytes the expert matrices take (floats, or MXFP4 blocks and scales); biases left out."""
  names = set(MXFP4_STORAGE) | set(STORAGE_SOURCE)
  return sum(param_bytes(v) for path, v in nnx.to_flat_state(nnx.state(model))
             if path[-1] in names)


@nnx.jit
def _logits(model: GptOss, tokens: jax.Array) -> jax.Array:
  return model(tokens).astype(jnp.float32)  # compiled once: eager, each op compiles alone


def quantization_error(reference: GptOss, quantized: GptOss, tokens: jax.Array) -> dict:
  """What quantizing cost on `tokens` [B, T]: the largest |logit difference| and the mean over
  tokens of KL(reference || quantized) of the next-token distributions, in nats."""
  want, got = _logits(reference, tokens), _logits(quantized, tokens)  # [B, T, V]
  log_p, log_q = jax.nn.log_softmax(want, axis=-1), jax.nn.log_softmax(got, axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [B, T]
  return {"max_abs_logit_diff": float(jnp.max(jnp.abs(want - got))),
          "mean_kl": float(jnp.mean(kl)),
          "expert_bytes": (expert_bytes(reference), expert_bytes(quantized))}
