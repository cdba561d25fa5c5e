"""The HTTP routes: /v1/chat/completions, /v1/completions (both streaming), /v1/models,
/health, /metrics, and the chat page at /."""

import asyncio
import importlib.resources
import json
import time
import uuid

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, PlainTextResponse, StreamingResponse

from nanogptoss_jax.serving.app import ApiError, Service, TextStream, error
from nanogptoss_jax.serving.engine import QueueFull


def _stop_strings(body) -> list[str]:
  stop = body.get("stop")
  if stop is None:
    return []
  stop = [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
    raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
  return stop


def create_app(service: Service, *, api_key: str | None = None) -> FastAPI:
  app = FastAPI(title="nanogptoss-jax")
  engine = service.engine

  @app.middleware("http")
  async def bearer(request: HttpRequest, call_next):
    if api_key and request.url.path.startswith("/v1/"):
      if request.headers.get("authorization") != f"Bearer {api_key}":
        return error(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                     "authentication_error")
    return await call_next(request)

  @app.exception_handler(ApiError)
  async def api_error(_, problem: ApiError):
    return error(problem.status, problem.message, param=problem.param)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, problem):
    return error(400, f"invalid request: {problem.errors()[0].get('msg')}")

  @app.get("/health")
  async def health():
    return {"status": "ok", "busy_slots": engine.busy_slots(), "slots": engine.slots}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": service.model_name, "object": "model", "created": service.created,
        "owned_by": "nanogptoss-jax", "chat_format": "plain" if service.plain_text else "harmony",
        "context_length": engine.cache_length}]}

  @app.get("/metrics")
  async def metrics():
    c = engine.counters
    lines = []
    for name, kind, value, text in [
        ("nanogptoss_requests_total", "counter", c["requests"], "requests accepted"),
        ("nanogptoss_rejected_total", "counter", c["rejected"], "requests refused: queue full"),
        ("nanogptoss_generated_tokens_total", "counter", c["tokens"], "tokens generated"),
        ("nanogptoss_busy_slots", "gauge", engine.busy_slots(), "slots decoding now"),
        ("nanogptoss_waiting_requests", "gauge", len(engine.waiting), "requests queued")]:
      lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

  @app.get("/", response_class=HTMLResponse)
  async def page():
    return (importlib.resources.files("nanogptoss_jax.serving") / "static" / "index.html"
            ).read_text()

  @app.post("/v1/responses")
  async def responses():
    raise ApiError(400, "/v1/responses is not supported; use /v1/chat/completions")

  async def complete(http: HttpRequest, chat: bool):
    try:
      body = await http.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
      raise ApiError(400, "the request body must be a JSON object")
    stop = _stop_strings(body)
    out = asyncio.Queue()
    requests = service.requests(body, chat, out, asyncio.get_running_loop())
    try:
      for request in requests:
        engine.submit(request)
    except QueueFull as full:
      for request in requests:
        request.cancel()
      return error(429, str(full), "rate_limit_exceeded")
    kind = "chat.completion" if chat else "text_completion"
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()), "model": service.model_name}
    streams = [TextStream(service, chat, stop) for _ in requests]
    counts = [0] * len(requests)
    reasons = [None] * len(requests)

    async def events():
      """(index, reasoning, content, finish reason or None) until every choice finished."""
      while None in reasons:
        index, what, value = await out.get()
        if reasons[index] is not None:
          continue
        if what == "done":
          reasons[index] = "length" if value == "length" else "stop"
          yield index, "", streams[index].finish(), reasons[index]
          continue
        counts[index] += len(value)
        reasoning, content, stopped = streams[index].feed(value)
        if stopped:
          requests[index].cancel()
          reasons[index] = "stop"
        yield index, reasoning, content, reasons[index]

    usage = lambda: {"prompt_tokens": len(requests[0].prompt) * len(requests),
                     "completion_tokens": sum(counts),
                     "total_tokens": len(requests[0].prompt) * len(requests) + sum(counts)}

    def chunk(index, reasoning, content, reason, first=False):
      if chat:
        delta = {"role": "assistant"} if first else {}
        if content:
          delta["content"] = content
        if reasoning:
          delta["reasoning_content"] = reasoning
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
      else:
        choice = {"index": index, "text": content, "logprobs": None, "finish_reason": reason}
      body = {**meta, "object": f"{kind}.chunk" if chat else kind, "choices": [choice]}
      if body_stream_usage:
        body["usage"] = None
      return f"data: {json.dumps(body)}\n\n"

    body_stream_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if body.get("stream"):
      async def sse():
        try:
          if chat:
            for index in range(len(requests)):
              yield chunk(index, "", "", None, first=True)
          async for index, reasoning, content, reason in events():
            if reasoning or content or reason:
              yield chunk(index, reasoning, content, reason)
          if body_stream_usage:
            final = {**meta, "object": kind + ".chunk" if chat else kind, "choices": [],
                     "usage": usage()}
            yield f"data: {json.dumps(final)}\n\n"
          yield "data: [DONE]\n\n"
        finally:  # the client went away (or we finished): free the slots
          for request in requests:
            request.cancel()
      return StreamingResponse(sse(), media_type="text/event-stream")

    try:
      async for _ in events():
        if await http.is_disconnected():
          break
    finally:
      for request in requests:
        request.cancel()
    if chat:
      choices = [{"index": i, "message": {"role": "assistant", "content": s.content,
                                          "reasoning_content": s.reasoning or None},
                  "logprobs": None, "finish_reason": reasons[i]} for i, s in enumerate(streams)]
    else:
      choices = [{"index": i, "text": s.content, "logprobs": None, "finish_reason": reasons[i]}
                 for i, s in enumerate(streams)]
    return {**meta, "object": kind, "choices": choices, "usage": usage()}

  @app.post("/v1/chat/completions")
  async def chat_completions(http: HttpRequest):
    return await complete(http, chat=True)

  @app.post("/v1/completions")
  async def completions(http: HttpRequest):
    return await complete(http, chat=False)

  return app
