"""Any checkpoint a user names -> (model, tokenizer): one of our run directories, a published
directory in either gpt-oss layout, or a hub id."""

from collections.abc import Callable

from nanogptoss_jax.pretrained import hub

# An adapter maps the loaded base model to the model to score (e.g. fine-tuned weights applied
# over it); `load_model(path, adapter=...)` and `HarnessModel` take one.
Adapter = Callable[[object], object]


def load_model(path: str, *, adapter: Adapter | None = None, dtype: str | None = None):
  """(model, tokenizer): load_checkpoint for a run directory, else load_pretrained (a directory
  with config.json, or a hub id; dtype None: float32 on the CPU, bfloat16 elsewhere)."""
  if hub.is_published(path):
    from nanogptoss_jax.pretrained.load import load_pretrained
    model, tokenizer = load_pretrained(path, dtype=dtype)
  else:
    from nanogptoss_jax import load_checkpoint  # the public name, wherever training keeps it
    model, tokenizer = load_checkpoint(path)
  if adapter is not None:
    model = adapter(model)
  return model, tokenizer
