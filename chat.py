"""`python chat.py --help`: the `nanogptoss-chat` command (nanogptoss_jax/commands/chat.py)."""

from nanogptoss_jax.commands.chat import main

if __name__ == "__main__":
  main()
