"""Frozen model configs for GPT-OSS and the GPT-2 baseline, validated at construction.

Each config owns what is true of its kind of model: how many positions it can hold, its FLOPs
per token, the run settings it needs. Shared code asks the config, never `isinstance`.
"""

import dataclasses
import math
from typing import Any

from nanogptoss_jax import o200k
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model.flops import attention_flops


class ConfigError(UserError, ValueError):
  """A config field holds a value that breaks a rule; the message names both."""


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
  if not ok:
    raise ConfigError(f"{field} {rule} (got {value!r})")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)  # True would pass for 1


def _check_positive(cfg, names) -> None:
  for name in names:
    value = getattr(cfg, name)
    _require(_is_int(value) and value > 0, name, "must be a positive integer (a Python int)",
             value)


def _check_finite(cfg, names) -> None:
  for name in names:
    value = getattr(cfg, name)
    _require(isinstance(value, (int, float)) and math.isfinite(value), name,
             "must be a finite number", value)


def _check_stop_tokens(cfg) -> None:
  _require(isinstance(cfg.stop_tokens, tuple) and all(
      _is_int(t) and 0 <= t < cfg.vocab_size for t in cfg.stop_tokens), "stop_tokens",
           f"must be a tuple of token ids in [0, vocab_size={cfg.vocab_size})", cfg.stop_tokens)


def yarn_bounds(cfg: "GptOssConfig") -> tuple[float, float]:
  """The NTK-by-parts ramp ends (low, high) in rotary-pair units, as the reference defines them."""
  d_half = cfg.head_dim / 2
  def bound(ntk):
    return d_half * math.log(cfg.initial_context_length / (ntk * 2 * math.pi)) / math.log(cfg.rope_theta)
  return bound(cfg.rope_ntk_beta), bound(cfg.rope_ntk_alpha)


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
  """GPT-OSS hyper-parameters; field names and defaults are those of the reference ModelConfig."""

  num_hidden_layers: int = 36
  num_experts: int = 128
  experts_per_token: int = 4
  vocab_size: int = o200k.VOCAB_SIZE
  hidden_size: int = 2880
  intermediate_size: int = 2880
  swiglu_limit: float = 7.0
  head_dim: int = 64
  num_attention_heads: int = 64
  num_key_value_heads: int = 8
  sliding_window: int = 128
  initial_context_length: int = 4096
  rope_theta: float = 150000.0
  rope_scaling_factor: float = 32.0
  rope_ntk_alpha: float = 1.0
  rope_ntk_beta: float = 32.0
  # Ours, not the reference's: the ids that end a generation (set from the tokenizer on loading).
  # How the model runs (dtypes, kernels, layouts) is the execution config's (model/execution.py).
  stop_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    _check_positive(self, ("num_hidden_layers", "num_experts", "experts_per_token", "vocab_size",
                           "hidden_size", "intermediate_size", "head_dim", "num_attention_heads",
                           "num_key_value_heads", "sliding_window", "initial_context_length"))
    _require(self.head_dim % 2 == 0, "head_dim", "must be even (RoPE rotates pairs)", self.head_dim)
    _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             f"must be a multiple of num_key_value_heads={self.num_key_value_heads}",
             self.num_attention_heads)
    _require(self.experts_per_token <= self.num_experts, "experts_per_token",
             f"must be <= num_experts={self.num_experts}", self.experts_per_token)
    _check_finite(self, ("swiglu_limit", "rope_theta", "rope_scaling_factor", "rope_ntk_alpha",
                         "rope_ntk_beta"))
    _require(self.swiglu_limit > 0, "swiglu_limit", "must be > 0", self.swiglu_limit)
    _require(self.rope_theta > 1, "rope_theta", "must be > 1", self.rope_theta)
    _require(self.rope_scaling_factor >= 1.0, "rope_scaling_factor",
             "must be >= 1 (1 turns YaRN off)", self.rope_scaling_factor)
    _require(self.rope_ntk_alpha > 0 and self.rope_ntk_beta > 0, "rope_ntk_alpha/rope_ntk_beta",
             "must be > 0", (self.rope_ntk_alpha, self.rope_ntk_beta))
    if self.rope_scaling_factor > 1.0:
      # The reference asserts this at forward time; a ramp outside (0, head_dim/2 - 1) or with
      # low >= high makes NTK-by-parts divide by zero or interpolate no frequency at all.
      low, high = yarn_bounds(self)
      _require(0 < low < high < self.head_dim / 2 - 1,
               "rope_ntk_alpha/rope_ntk_beta/initial_context_length",
               f"must give YaRN ramp bounds 0 < low < high < head_dim/2 - 1 = {self.head_dim / 2 - 1}"
               " (raise initial_context_length, lower rope_ntk_beta, or set rope_scaling_factor=1)",
               (round(low, 3), round(high, 3)))
    _check_stop_tokens(self)

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_attention_heads // self.num_key_value_heads

  def layer_window(self, layer: int) -> int | None:
    """Keys a query in `layer` may see: `sliding_window` on even layers, all (None) on odd."""
    return self.sliding_window if layer % 2 == 0 else None

  @property
  def max_positions(self) -> int:
    """Longest sequence RoPE is meant for: the configured context stretched by YaRN's factor
    (gpt-oss: 4,096 x 32 = 131,072)."""
    return int(self.initial_context_length * self.rope_scaling_factor)

  def forward_flops_per_token(self, context_len: int) -> float:
    """2 * (multiply-adds) of one token's forward pass; embedding lookups count as free."""
    d = self.hidden_size
    q_size = self.num_attention_heads * self.head_dim
    kv_size = self.num_key_value_heads * self.head_dim
    per_layer = d * (q_size + 2 * kv_size) + q_size * d  # qkv, out
    per_layer += d * self.num_experts  # router
    per_layer += self.experts_per_token * 3 * d * self.intermediate_size  # mlp1 (2F) + mlp2 (F)
    windows = [self.layer_window(layer) for layer in range(self.num_hidden_layers)]
    matmul = self.num_hidden_layers * per_layer + d * self.vocab_size  # + unembedding
    return 2 * (matmul + attention_flops(context_len, q_size, windows))

  def run_rules(self, context_len: int) -> list[tuple[bool, str]]:
    """(holds, message) for the run settings this model needs."""
    return [(context_len <= self.max_positions,
             f"train.context_len={context_len} must be <= initial_context_length x "
             f"rope_scaling_factor = {self.max_positions}")]

  def replace(self, **changes) -> "GptOssConfig":
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Gpt2Config:
  """GPT-2 hyper-parameters (names as in our GPT-OSS config where the concept is the same)."""

  num_hidden_layers: int = 12
  vocab_size: int = o200k.VOCAB_SIZE
  hidden_size: int = 768
  num_attention_heads: int = 12
  intermediate_size: int | None = None  # None: 4 * hidden_size, as in GPT-2
  max_position_embeddings: int = 1024
  dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  stop_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    _check_positive(self, ("num_hidden_layers", "vocab_size", "hidden_size",
                           "num_attention_heads", "max_position_embeddings"))
    _require(self.hidden_size % self.num_attention_heads == 0, "hidden_size",
             f"must be a multiple of num_attention_heads={self.num_attention_heads}",
             self.hidden_size)
    if self.intermediate_size is not None:
      _check_positive(self, ("intermediate_size",))
    _check_finite(self, ("layer_norm_eps",))  # dropout's range check below refuses inf and NaN
    _require(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)
    _require(self.layer_norm_eps > 0, "layer_norm_eps", "must be > 0", self.layer_norm_eps)
    _check_stop_tokens(self)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def mlp_size(self) -> int:
    return self.intermediate_size or 4 * self.hidden_size

  @property
  def max_positions(self) -> int:
    """The learned position table's length."""
    return self.max_position_embeddings

  def forward_flops_per_token(self, context_len: int) -> float:
    """2 * (multiply-adds) of one token's forward pass; embedding lookups count as free."""
    d = self.hidden_size
    per_layer = d * 3 * d + d * d + 2 * d * self.mlp_size  # c_attn, c_proj, c_fc + c_proj
    matmul = self.num_hidden_layers * per_layer + d * self.vocab_size
    return 2 * (matmul + attention_flops(context_len, d, [None] * self.num_hidden_layers))

  def run_rules(self, context_len: int) -> list[tuple[bool, str]]:
    # Learned positions: a window longer than the table has no embedding for its tail.
    return [(context_len <= self.max_position_embeddings,
             f"train.context_len={context_len} must be <= "
             f"model.max_position_embeddings={self.max_position_embeddings}")]

  def replace(self, **changes) -> "Gpt2Config":
    return dataclasses.replace(self, **changes)


# Named presets: the released models' config.json.
GPT_OSS_20B = GptOssConfig(num_hidden_layers=24, num_experts=32, experts_per_token=4)
GPT_OSS_120B = GptOssConfig()
