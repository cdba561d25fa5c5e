"""Writes harmony chat conversations built from TinyStories (nanogptoss_jax/data/chat_stories.py):
OUT/train.jsonl from the training stories, OUT/validation.jsonl from the held-out validation ones.

  .venv/bin/python scripts/build_story_chats.py --tinystories ../shared/data/tinystories \
      --out data/tinystories_chat [--seed 0] [--max-train N] [--max-validation N]

Then fine-tune with the chat data's path set to OUT.
"""

import argparse
import sys

from nanogptoss_jax import cli
from nanogptoss_jax.data.chat_stories import write_story_chats


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tinystories", required=True,
                      help="a TinyStories copy: its .txt files, their directory, a datasets "
                           "directory, or the hub id roneneldan/TinyStories")
  parser.add_argument("--out", required=True, help="directory to write the .jsonl files into")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-train", type=int, default=0, help="stories to read (0: all)")
  parser.add_argument("--max-validation", type=int, default=0, help="stories to read (0: all)")
  args = parser.parse_args(argv)
  counts = write_story_chats(args.tinystories, args.out, seed=args.seed,
                             max_train=args.max_train, max_validation=args.max_validation)
  for split, count in counts.items():
    print(f"{args.out}/{split}.jsonl: {count['conversations']} conversations from "
          f"{count['stories']} stories")


if __name__ == "__main__":
  cli.run(main, sys.argv[1:])
