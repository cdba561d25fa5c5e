"""Model FLOPs per trained token (matmuls only), for model-FLOPs utilisation (MFU)."""

# Training does the forward matmuls once and the backward twice (activation and weight grads).
TRAIN_PASSES = 3


def mean_keys(context_len: int, window: int | None) -> float:
  """Average number of keys a query sees in a causal window over positions 0..T-1."""
  seen = [min(t + 1, window or context_len) for t in range(context_len)]
  return sum(seen) / context_len


def attention_flops(context_len: int, q_size: int, windows: list[int | None]) -> float:
  """Multiply-adds per token of QK^T and PV over layers with these windows (None: full)."""
  return sum(2 * mean_keys(context_len, window) * q_size for window in windows)


def train_flops_per_token(cfg, context_len: int) -> float:
  """Any model config's training FLOPs per token (its forward_flops_per_token, three times)."""
  return TRAIN_PASSES * cfg.forward_flops_per_token(context_len)
