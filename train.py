"""`python train.py --help`: the `nanogptoss-train` command (nanogptoss_jax/commands/train.py)."""

from nanogptoss_jax.commands.train import main

if __name__ == "__main__":
  main()
