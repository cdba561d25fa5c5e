"""The seed's medium GPT-OSS vs its GPT-2 twin, 3 seeds each: a GPU job (hours, not minutes)."""

from pathlib import Path

from nanogptoss_jax.experiments.compare_config import CompareConfig


def get_config() -> CompareConfig:
  """The seed-sized comparison, with the medium run's own steps, batch and schedule."""
  return CompareConfig(base=str(Path(__file__).with_name("medium.py")), seeds=(0, 1, 2),
                       out_dir="runs/compare_medium", sample_tokens=128)
