"""Nano GPT-OSS vs its GPT-2 twin, 3 seeds each: about 20 minutes on a 2-core CPU.

    python compare.py --config configs/compare_nano.py --run.data.path=/path/to/tinystories/hf
"""

from pathlib import Path

from nanogptoss_jax.experiments.compare_config import CompareConfig

# Six runs of 150 steps of 16 x 256 tokens (about 0.6M tokens) each, at roughly a second per step
# for either model on 2 idle cores, plus ~30 s per run of startup and evals (19 min 19 s in all).
NANO_OVERRIDES = ("train.steps=150", "train.eval_every=30", "optim.warmup_steps=15")


def get_config() -> CompareConfig:
  """The nano comparison; its runs land in runs/compare_nano/<model>_seed<seed>."""
  return CompareConfig(base=str(Path(__file__).with_name("nano.py")), seeds=(0, 1, 2),
                       out_dir="runs/compare_nano", overrides=NANO_OVERRIDES, sample_tokens=128)
