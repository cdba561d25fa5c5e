"""`python -m nanogptoss_jax.export --help`: the `nanogptoss-export` command."""

from nanogptoss_jax.commands.export import main

if __name__ == "__main__":
  main()
