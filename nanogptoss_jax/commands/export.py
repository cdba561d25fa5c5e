"""Export a trained run (or a loaded checkpoint directory) to the Hugging Face layout.

example: nanogptoss-export --checkpoint runs/nano --out exports/nano
"""

import argparse
import logging

from nanogptoss_jax import cli
from nanogptoss_jax.commands.generate import RUN_OR_PRETRAINED, checkpoint_parser


def parser() -> argparse.ArgumentParser:
  parse = checkpoint_parser("nanogptoss-export", __doc__, RUN_OR_PRETRAINED)
  parse.add_argument("--out", required=True, help="directory to write (created if missing)")
  parse.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  return parse


def _export(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  cli.setup_logging(absl_level=logging.ERROR)
  # Imported here, after `cli.run` set the process up (JAX is heavy to import).
  from nanogptoss_jax.pretrained import hub
  from nanogptoss_jax.pretrained.export import save_pretrained
  from nanogptoss_jax.pretrained.load import load_pretrained
  from nanogptoss_jax.training.weights import load_checkpoint
  if hub.is_published(args.checkpoint):  # a directory with config.json, or a hub id
    model, tokenizer = load_pretrained(args.checkpoint, dtype="float32")
  else:
    model, tokenizer = load_checkpoint(args.checkpoint)
  save_pretrained(model, tokenizer, args.out, dtype=args.dtype)
  print(f"wrote {args.out} (Hugging Face layout, {args.dtype})")


def main(argv: list[str] | None = None) -> None:
  cli.run(_export, argv)
