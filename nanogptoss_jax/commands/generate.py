"""Sample from a trained run directory, streaming text to the terminal.

example: nanogptoss-generate --checkpoint runs/nano --prompt "Once upon a time" --max-new-tokens 200 --temperature 0.8 --top-k 50
"""

import argparse
import logging

from nanogptoss_jax import cli
from nanogptoss_jax.errors import UsageError


def _number(kind, low, high=None, *, low_open=False):
  """An argparse type: `kind` within [low, high] (or (low, high] with low_open)."""
  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    too_low = value <= low if low_open else value < low
    if too_low or (high is not None and value > high) or value != value:  # NaN
      span = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
      raise argparse.ArgumentTypeError(f"must lie in {span}, got {text}")
    return value
  return parse


class _Parser(argparse.ArgumentParser):
  """argparse whose mistakes are a UsageError: one line from `cli.run`, not the usage text."""

  def error(self, message: str):
    raise UsageError(f"{message} (see {self.prog} --help)")


RUN_OR_PRETRAINED = ("a run directory written by train.py, a pretrained gpt-oss directory, or a "
                     "hub id (openai/gpt-oss-20b; openai/gpt-oss-20b/original for OpenAI's layout)")


def checkpoint_parser(prog: str, doc: str, checkpoint_help: str) -> _Parser:
  """What every command over a checkpoint starts from: its --help text, --checkpoint, --debug."""
  parse = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parse.add_argument("--checkpoint", required=True, help=checkpoint_help)
  parse.add_argument(cli.DEBUG_FLAG, action="store_true", help="tracebacks for user errors too")
  return parse


def parser() -> argparse.ArgumentParser:
  parse = checkpoint_parser("nanogptoss-generate", __doc__, RUN_OR_PRETRAINED)
  parse.add_argument("--prompt", default="Once upon a time")
  parse.add_argument("--max-new-tokens", type=_number(int, 1), default=200)
  parse.add_argument("--temperature", type=_number(float, 0), default=0.8, help="0 means greedy")
  parse.add_argument("--top-k", type=_number(int, 1), default=None)
  parse.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=None)
  parse.add_argument("--seed", type=int, default=0)
  parse.add_argument("--num-samples", type=_number(int, 1), default=1,
                     help="samples drawn one after another")
  return parse


def _generate(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  cli.setup_logging(absl_level=logging.ERROR)  # orbax's notes on read-only directories
  # Imported here, after `cli.run` set the process up (JAX is heavy to import).
  from nanogptoss_jax.sampling.text import generate_text
  from nanogptoss_jax.training.weights import load_checkpoint
  from nanogptoss_jax.pretrained import hub
  if hub.is_published(args.checkpoint):  # a directory with config.json, or a hub id
    from nanogptoss_jax.pretrained.load import load_pretrained
    model, tokenizer = load_pretrained(args.checkpoint)
  else:
    model, tokenizer = load_checkpoint(args.checkpoint)
  for index in range(args.num_samples):
    print(args.prompt, end="", flush=True)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, stream=True,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed + index)
    print("\n" + "-" * 40 if index + 1 < args.num_samples else "")


def main(argv: list[str] | None = None) -> None:
  cli.run(_generate, argv)


if __name__ == "__main__":
  main()
