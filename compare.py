"""`python compare.py --help`: the `nanogptoss-compare` command (nanogptoss_jax/commands/compare.py)."""

from nanogptoss_jax.commands.compare import main

if __name__ == "__main__":
  main()
