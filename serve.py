"""`python serve.py --help`: the `nanogptoss-serve` command (nanogptoss_jax/commands/serve.py)."""

from nanogptoss_jax.commands.serve import main

if __name__ == "__main__":
  main()
