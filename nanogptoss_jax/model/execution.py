"""How a model runs, apart from what it computes: dtypes, which kernel computes each part, what
the backward pass recomputes, how the layers and expert weights are stored, the device mesh.

The architecture config (`GptOssConfig`, `Gpt2Config`) defines the function; this one only how it
is evaluated, so a resume, a loader or a server may change any field of it. Every `auto` is
resolved in `model/choices.py`, for `platform` (default: the backend JAX runs on), so a program
lowered for another platform picks that platform's kernels.
"""

import dataclasses

import jax.numpy as jnp

from nanogptoss_jax.model import choices
from nanogptoss_jax.model.config import ConfigError

# Compute dtypes a user may ask for; params are float32 unless param_dtype says otherwise.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PLATFORMS = ("auto", "cpu", "gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class ExecutionConfig:
  """Storage and compute dtypes, kernel choices (model/choices.py), remat, layouts, mesh."""

  param_dtype: str = "float32"
  dtype: str = "float32"
  attention_impl: str = "auto"
  matmul_impl: str = "auto"
  loss_impl: str = "auto"
  moe_impl: str = "auto"
  # "mxfp4": expert matrices stay as OpenAI's 4-bit blocks + scales (model/mxfp4.py), decoded
  # inside the MoE per selected expert; "float": ordinary trainable weights.
  expert_format: str = "float"
  # "int8": the token embedding and attention's qkv and output kernels stored as int8 with a
  # float32 scale per output channel (model/int8.py, weight-only): frozen, for LoRA and serving.
  dense_format: str = "float"
  mxfp4_impl: str = "auto"
  remat: str = "none"  # choices.REMAT_POLICIES: what the backward pass recomputes
  layers_impl: str = "auto"  # choices.LAYERS_IMPLS: blocks in a Python loop or scanned
  platform: str = "auto"  # the platform `auto` choices are made for
  fsdp: int = 1  # size of the mesh's fsdp axis; the data axis takes the remaining devices
  # Expert parallelism: the mesh's expert axis splits the experts (E) of every MoE layer, and
  # tokens travel to their experts' devices (kernels/expert_parallel.py); like data, it also
  # splits the batch elsewhere in the model.
  expert: int = 1
  tensor: int = 1  # the mesh's tensor axis: attention heads, vocabulary (and experts) split
  # Per-expert slots for the tokens one device sends one expert, as a multiple of the even
  # share (assignments / experts); 0 is dropless (a slot for every token). Assignments past
  # the slots are dropped and counted (metric `expert_dropped`).
  expert_capacity: float = 0.0

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      _require(getattr(self, name) in DTYPES, name, tuple(DTYPES), getattr(self, name))
    for name, allowed in (("attention_impl", choices.ATTENTION_IMPLS),
                          ("matmul_impl", choices.MATMUL_IMPLS),
                          ("loss_impl", choices.LOSS_IMPLS), ("moe_impl", choices.MOE_IMPLS),
                          ("expert_format", choices.EXPERT_FORMATS),
                          ("dense_format", choices.DENSE_FORMATS),
                          ("mxfp4_impl", choices.MXFP4_IMPLS),
                          ("remat", choices.REMAT_POLICIES), ("layers_impl", choices.LAYERS_IMPLS),
                          ("platform", PLATFORMS)):
      _require(getattr(self, name) in allowed, name, allowed, getattr(self, name))
    for name in ("fsdp", "expert", "tensor"):
      size = getattr(self, name)
      if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        raise ConfigError(f"{name} must be a positive integer (got {size!r})")
    if not (isinstance(self.expert_capacity, (int, float)) and self.expert_capacity >= 0):
      raise ConfigError(f"expert_capacity must be a number >= 0 (0: dropless) "
                        f"(got {self.expert_capacity!r})")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]

  def replace(self, **changes) -> "ExecutionConfig":
    return dataclasses.replace(self, **changes)


def _require(ok: bool, field: str, allowed, value) -> None:
  if not ok:
    raise ConfigError(f"{field} must be one of {allowed} (got {value!r})")


# The device mesh's axes (parallel/mesh.py), and those a batch is split over: every one but
# tensor, whose devices share their tokens and split the heads instead.
DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"
MESH_AXES = (DATA, FSDP, EXPERT, TENSOR)
BATCH_AXES = (DATA, FSDP, EXPERT)

# The fields that moved here from the architecture configs: configs saved before name them
# under `model`, and `config_io` moves them (with `train.fsdp` and `train.expert`) into `execution`.
FIELDS = tuple(field.name for field in dataclasses.fields(ExecutionConfig))
