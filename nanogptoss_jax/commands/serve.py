"""An OpenAI-compatible HTTP server (with a chat page at /) over a checkpoint.

example: nanogptoss-serve --checkpoint runs/nano --port 8000   # then open http://127.0.0.1:8000/
"""

import argparse
import logging
import time

from nanogptoss_jax import cli
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.commands.generate import RUN_OR_PRETRAINED, _number, checkpoint_parser


def parser() -> argparse.ArgumentParser:
  parse = checkpoint_parser("nanogptoss-serve", __doc__, RUN_OR_PRETRAINED)
  parse.add_argument("--host", default="127.0.0.1")
  parse.add_argument("--port", type=_number(int, 0, 65535), default=8000)
  parse.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY`")
  parse.add_argument("--slots", type=_number(int, 1), default=8,
                     help="requests decoded together (continuous batching)")
  parse.add_argument("--max-queue", type=_number(int, 1), default=64,
                     help="waiting requests beyond this get 429")
  parse.add_argument("--context", type=_number(int, 2), default=None,
                     help="cache length per slot (default: 8192, at most the model's "
                          "max_positions)")
  parse.add_argument("--warm-up", default="128", metavar="LENGTHS",
                     help="comma-separated prompt lengths whose prefill (every batch size) "
                          "compiles before serving, so a burst of requests waits for no "
                          "compile; '' for none (default: 128)")
  parse.add_argument("--chat-format", choices=("auto", "harmony", "plain"), default="auto")
  parse.add_argument("--model-name", default=None, help="the id in /v1/models")
  return parse


def _serve(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  cli.setup_logging(absl_level=logging.ERROR)
  import pathlib

  import uvicorn

  from nanogptoss_jax.serving.app import Service
  from nanogptoss_jax.serving.engine import Engine
  from nanogptoss_jax.serving.open_model import open_model
  from nanogptoss_jax.serving.routes import create_app
  model, tokenizer, plain = open_model(args.checkpoint, args.chat_format)
  engine = Engine(model, slots=args.slots, cache_length=args.context, max_queue=args.max_queue)
  try:
    lengths = [int(n) for n in args.warm_up.split(",") if n.strip()]
  except ValueError:
    raise UserError(f"--warm-up {args.warm_up!r} must be comma-separated token counts") from None
  if lengths:
    start = time.perf_counter()
    logging.warning("compiling prefill and decode for prompts of up to %s tokens ...",
                    max(lengths))
    engine.warm_up(*lengths)
    logging.warning("compiled in %.1f s", time.perf_counter() - start)
  name = args.model_name or pathlib.Path(args.checkpoint).resolve().name
  service = Service(engine, tokenizer, model_name=name, plain_text=plain)
  logging.warning("serving %s (%s) on http://%s:%d/", name, "plain text" if plain else "harmony",
                  args.host, args.port)
  try:
    uvicorn.run(create_app(service, api_key=args.api_key), host=args.host, port=args.port,
                log_level="warning")
  finally:
    engine.close()


def main(argv: list[str] | None = None) -> None:
  cli.run(_serve, argv)


if __name__ == "__main__":
  main()
