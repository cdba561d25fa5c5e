"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over one Engine.

Chat requests are rendered in harmony (channels analysis -> `reasoning_content`, final ->
`content`) or, for models that never learned harmony, in plain-text mode: the prompt is the last
user message and the continuation is the answer.
"""

import asyncio
import time

from fastapi.responses import JSONResponse

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.serving.engine import Engine, Request


def error(status: int, message: str, kind: str = "invalid_request_error", param=None):
  """OpenAI's error body."""
  return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                 "code": None}}, status_code=status)


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None):
    super().__init__(message)
    self.status, self.message, self.param = status, message, param


def _number(body, name, default, low, high=None):
  value = body.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (
      high is not None and value > high):
    span = f"[{low}, {high}]" if high is not None else f">= {low}"
    raise ApiError(400, f"{name} must be a number in {span}, got {value!r}", name)
  return value


class Service:
  """Turns API bodies into engine Requests and engine output into OpenAI responses."""

  def __init__(self, engine: Engine, tokenizer, *, model_name: str, plain_text: bool):
    self.engine, self.tokenizer = engine, tokenizer
    self.model_name, self.plain_text = model_name, plain_text
    self.created = int(time.time())

  def stop_ids(self, chat: bool) -> tuple[int, ...]:
    """Ids that end an answer: harmony's <|return|> and <|call|> in the model's own ids (a
    compact vocabulary numbers them differently), or the tokenizer's for plain text."""
    if self.plain_text or not chat:
      return tuple(self.tokenizer.stop_ids)
    return harmony.stop_ids(self.tokenizer)

  def prompt(self, body: dict, chat: bool) -> list[int]:
    if not chat:
      text = body.get("prompt")
      if not isinstance(text, str):
        raise ApiError(400, "prompt must be a string", "prompt")
      return self.tokenizer.encode(text)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
      raise ApiError(400, "messages must be a non-empty list", "messages")
    if self.plain_text:
      users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
      if not users or not isinstance(users[-1], str):
        raise ApiError(400, "plain-text mode needs a user message with string content", "messages")
      return self.tokenizer.encode(users[-1])
    effort = body.get("reasoning_effort") or "medium"
    try:
      return harmony.render_chat([{k: v for k, v in m.items() if k in ("role", "content")}
                                  if isinstance(m, dict) else m for m in messages],
                                 tokenizer=self.tokenizer, reasoning_effort=effort)
    except harmony.HarmonyError as problem:
      raise ApiError(400, str(problem), "messages") from None

  def requests(self, body: dict, chat: bool, out: asyncio.Queue, loop) -> list[Request]:
    """One engine Request per choice (`n`), reporting into `out` as (index, kind, value)."""
    if body.get("model") not in (None, self.model_name):
      raise ApiError(404, f"the model {body.get('model')!r} does not exist; "
                          f"this server serves {self.model_name!r}", "model")
    if body.get("tools") or body.get("functions"):
      raise ApiError(400, "tools and function calling are not supported by this server", "tools")
    prompt = self.prompt(body, chat)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    max_tokens = int(_number({"max_tokens": max_tokens}, "max_tokens", 256, 1))
    temperature = float(_number(body, "temperature", 1.0, 0, 2))
    top_p = float(_number(body, "top_p", 1.0, 0, 1)) or 1.0
    n = int(_number(body, "n", 1, 1, 8))
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
      raise ApiError(400, f"seed must be an integer, got {seed!r}", "seed")
    try:
      self.engine.check(len(prompt), max_tokens)
    except UserError as problem:
      raise ApiError(400, str(problem), "max_tokens") from None
    stop_ids = self.stop_ids(chat)
    made = []
    for index in range(n):
      put = lambda item, index=index: loop.call_soon_threadsafe(out.put_nowait, (index, *item))
      made.append(Request(prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=None if seed is None else seed + index,
                          stop_ids=stop_ids, on_tokens=lambda t, put=put: put(("tokens", t)),
                          on_done=lambda why, put=put: put(("done", why))))
    return made


class TextStream:
  """Ids of one choice -> (reasoning, content) text deltas, and the stop strings' cut."""

  def __init__(self, service: Service, chat: bool, stop: list[str]):
    self.harmony = chat and not service.plain_text
    self.tokenizer = service.tokenizer
    self.parser = harmony.StreamParser(self.tokenizer) if self.harmony else None
    self.ids, self.sent, self.stop = [], "", stop
    self.content, self.reasoning, self.pending = "", "", ""

  def feed(self, tokens) -> tuple[str, str, bool]:
    """(new reasoning, new content, hit a stop string)."""
    reasoning, content = "", ""
    if self.harmony:
      for token in tokens:
        for channel, text in self.parser.feed(token):
          if channel == "final":
            content += text
          else:
            reasoning += text
    else:
      self.ids += tokens
      text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
      content, self.sent = text[len(self.sent):], text
    # Text that may begin a stop string is held back until it is known not to: a stop string
    # split over two chunks must not stream its first half.
    whole = self.content + self.pending + content
    cut = min((whole.find(s) for s in self.stop if s and s in whole), default=-1)
    end = cut if cut >= 0 else len(whole) - max(
        (k for s in self.stop for k in range(1, len(s)) if whole.endswith(s[:k])), default=0)
    content, self.pending = whole[len(self.content):end], "" if cut >= 0 else whole[end:]
    self.content += content
    self.reasoning += reasoning
    return reasoning, content, cut >= 0

  def finish(self) -> str:
    """The held-back text once the choice ended without a stop string."""
    rest, self.pending = self.pending, ""
    self.content += rest
    return rest
