"""Chat with a checkpoint in the terminal: the conversation is kept, answers stream as generated.

example: nanogptoss-chat --checkpoint runs/nano --temperature 0.8 --max-tokens 200
Type a message and Enter. /reset starts a new conversation, /quit (or EOF) exits. Ctrl-C during
an answer stops that answer; Ctrl-C twice at the prompt exits. Turn n of a conversation samples
with seed + n, so after /reset the same messages get the same answers.
Our runs trained on plain text never learned harmony: they answer in plain-text mode (the prompt
is your last message alone). Pretrained gpt-oss directories and our runs fine-tuned on chat data
(configs/finetune_nano_chat.py) speak harmony; the `analysis` channel is shown dimmed on a
terminal, or with --show-analysis.
"""

import argparse
import logging
import queue
import signal
import sys
import threading

from nanogptoss_jax import cli
from nanogptoss_jax.commands.generate import RUN_OR_PRETRAINED, _number, checkpoint_parser
from nanogptoss_jax.errors import UserError

DIM, UNDIM = "\x1b[2m", "\x1b[0m"
STOPPED = "[stopped]"
PROMPT = "> "


def parser() -> argparse.ArgumentParser:
  parse = checkpoint_parser("nanogptoss-chat", __doc__, RUN_OR_PRETRAINED)
  parse.add_argument("--system", default=None, help="instructions (harmony's developer message)")
  parse.add_argument("--reasoning-effort", choices=("low", "medium", "high"), default="medium")
  parse.add_argument("--temperature", type=_number(float, 0, 2), default=0.8,
                     help="0 means greedy")
  parse.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0)
  parse.add_argument("--max-tokens", type=_number(int, 1), default=256,
                     help="new tokens per answer at most")
  parse.add_argument("--seed", type=int, default=0)
  parse.add_argument("--show-analysis", action="store_true",
                     help="print the analysis channel (always shown, dimmed, on a terminal)")
  parse.add_argument("--context", type=_number(int, 2), default=4096,
                     help="tokens the conversation may hold (capped by the model's)")
  parse.add_argument("--chat-format", choices=("auto", "harmony", "plain"), default="auto")
  return parse


class Chat:
  """One conversation over a one-slot serving Engine (the server's sampler, streams and RNG)."""

  def __init__(self, service, args, out=sys.stdout):
    self.service, self.args, self.out = service, args, out
    self.dim = out.isatty()
    self.show_analysis = args.show_analysis or self.dim
    self.reset()

  def reset(self) -> None:
    self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

  def turns(self) -> int:
    return sum(m["role"] == "assistant" for m in self.messages)

  def answer(self, text: str) -> None:
    """Streams the answer to `text` onto `out`; Ctrl-C stops it (the partial answer is kept)."""
    from nanogptoss_jax.serving.app import ApiError, TextStream
    from nanogptoss_jax.serving.engine import Request
    messages = self.messages + [{"role": "user", "content": text}]
    body = {"messages": messages, "reasoning_effort": self.args.reasoning_effort}
    try:
      prompt = self.service.prompt(body, chat=True)
      self.service.engine.check(len(prompt), self.args.max_tokens)
    except (ApiError, UserError) as problem:
      print(f"error: {getattr(problem, 'message', problem)} (/reset starts over)", file=sys.stderr)
      return
    events = queue.Queue()
    request = Request(prompt=prompt, max_tokens=self.args.max_tokens,
                      temperature=self.args.temperature, top_p=self.args.top_p,
                      seed=self.args.seed + self.turns(),
                      stop_ids=self.service.stop_ids(chat=True),
                      on_tokens=lambda t: events.put(("tokens", t)),
                      on_done=lambda why: events.put(("done", why)))
    stream = TextStream(self.service, chat=True, stop=[])
    # Ctrl-C sets a flag rather than raising: a KeyboardInterrupt inside a queue's condition
    # wait can leave its lock held, and then neither this thread nor the engine's moves again.
    interrupted = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
    try:
      self.service.engine.submit(request)
      finished = self._print_stream(events, stream, interrupted)
    finally:
      signal.signal(signal.SIGINT, previous)
    if not finished:
      request.cancel()
      while events.get()[0] != "done":  # the engine frees the slot at its next chunk
        pass
      self._write(f"{UNDIM if self.dim else ''} {STOPPED}")
    self._write("\n")
    self.messages = messages + [{"role": "assistant", "content": stream.content}]

  def _print_stream(self, events, stream, interrupted: threading.Event) -> bool:
    """Prints the answer as it comes; True when it finished, False when Ctrl-C stopped it."""
    in_analysis, finished = False, False
    while not interrupted.is_set():
      try:  # a timeout, so that Ctrl-C is seen promptly
        kind, value = events.get(timeout=0.1)
      except queue.Empty:
        continue
      if kind == "done":
        finished = True
        break
      reasoning, content, _ = stream.feed(value)
      if reasoning and self.show_analysis:
        self._write((DIM if self.dim and not in_analysis else "") + reasoning)
        in_analysis = True
      if content:
        self._write((UNDIM + "\n" if self.dim else "\n") if in_analysis else "")
        in_analysis = False
        self._write(content)
    if in_analysis and self.dim:
      self._write(UNDIM)
    return finished

  def _write(self, text: str) -> None:
    self.out.write(text)
    self.out.flush()


def _read_line(interrupted_once: list[bool]) -> str | None:
  """The next line, or None to exit (EOF, or Ctrl-C twice in a row at the prompt)."""
  while True:
    try:
      line = input(PROMPT)
      interrupted_once[0] = False
      return line
    except EOFError:
      return None
    except KeyboardInterrupt:
      if interrupted_once[0]:
        return None
      interrupted_once[0] = True
      print("\n(Ctrl-C again, /quit or EOF exits)", flush=True)


def _chat(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  cli.setup_logging(absl_level=logging.ERROR)
  import pathlib

  from nanogptoss_jax.serving.app import Service
  from nanogptoss_jax.serving.engine import Engine
  from nanogptoss_jax.serving.open_model import open_model
  model, tokenizer, plain = open_model(args.checkpoint, args.chat_format)
  engine = Engine(model, slots=1, cache_length=args.context, max_queue=1)
  service = Service(engine, tokenizer, model_name=pathlib.Path(args.checkpoint).name,
                    plain_text=plain)
  chat = Chat(service, args)
  print(f"chatting with {args.checkpoint} ({'plain text' if plain else 'harmony'}); "
        "/reset, /quit", file=sys.stderr, flush=True)
  interrupted_once = [False]
  try:
    while (line := _read_line(interrupted_once)) is not None:
      command = line.strip()
      if command == "/quit":
        break
      if command == "/reset":
        chat.reset()
        print("(new conversation)", flush=True)
      elif command:
        chat.answer(line)
  finally:
    engine.close()


def main(argv: list[str] | None = None) -> None:
  cli.run(_chat, argv)


if __name__ == "__main__":
  main()
