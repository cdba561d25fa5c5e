"""GPT-2 twin of configs/nano.py: same depth, width, heads, vocabulary, data and optimiser."""

from pathlib import Path

from nanogptoss_jax.config_cli import load_config_file
from nanogptoss_jax.run_config import RunConfig, gpt2_twin


def get_config() -> RunConfig:
  """Built from the GPT-OSS config so the two cannot drift apart."""
  return gpt2_twin(load_config_file(Path(__file__).with_name("nano.py")))
