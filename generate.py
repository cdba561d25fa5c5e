"""`python generate.py --help`: the `nanogptoss-generate` command (nanogptoss_jax/commands/generate.py)."""

from nanogptoss_jax.commands.generate import main

if __name__ == "__main__":
  main()
