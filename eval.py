"""`python eval.py --help`: the `nanogptoss-eval` command (nanogptoss_jax/commands/eval.py)."""

from nanogptoss_jax.commands.eval import main

if __name__ == "__main__":
  main()
