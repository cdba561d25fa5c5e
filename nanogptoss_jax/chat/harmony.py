"""OpenAI's harmony chat format for gpt-oss, in plain Python over our tokenizer.

A conversation renders as `<|start|>{role}[ to={recipient}][<|channel|>{channel}][ {content
type}]<|message|>{text}<|end|>` per message: first harmony's default `system` message (identity,
knowledge cutoff, date, reasoning effort, the valid channels), then a `developer` message holding
the chat's system and developer messages as `# Instructions` and any function tools as
TypeScript (chat/harmony_tools.py), then the turns. Chat messages take OpenAI's form: an
assistant's `thinking` is its `analysis` message and its `content` the `final` one; a tool call
is a `commentary` message to `functions.<name>` ending in `<|call|>` (its `content`, if any, a
commentary preamble before it); a `tool` message answers as `functions.<name>`. A message may
instead name its harmony `channel` directly. The `analysis` before the conversation's last
`final` message is dropped (those turns are over; harmony's docs say so, openai-harmony 0.0.8
drops only the analysis before the first `final`, harmony PR #96); the analysis of a turn still
calling tools stays. Generation stops on `<|return|>` (the answer is done) or `<|call|>`.
"""

import json

from nanogptoss_jax import o200k
from nanogptoss_jax.chat import harmony_tools

REASONING_EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
ROLES = ("system", "developer", "user", "assistant", "tool")
INSTRUCTION_ROLES = ("system", "developer")  # both become the developer message's instructions
STOP_IDS = (o200k.SPECIAL_IDS[o200k.RETURN], o200k.SPECIAL_IDS[o200k.CALL])
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
# A tool call's content type: harmony writes `<|constrain|>` as its special token.
CALL_CONTENT_TYPE = o200k.CONSTRAIN + "json"

_START, _END, _MESSAGE, _CHANNEL, _CONSTRAIN, _RETURN, _CALL = (
    o200k.SPECIAL_IDS[name] for name in (o200k.START, o200k.END, o200k.MESSAGE, o200k.CHANNEL,
                                         o200k.CONSTRAIN, o200k.RETURN, o200k.CALL))
_MESSAGE_ENDS = (_END, *STOP_IDS)


class HarmonyError(ValueError):
  """A conversation harmony cannot express, or a tokenizer without harmony's special tokens."""


def _full_tokenizer():
  from nanogptoss_jax.data.tokenizer import FullTokenizer  # loads tiktoken's table once asked
  return FullTokenizer()


def supports_harmony(tokenizer) -> bool:
  """Whether every harmony special token is one model id of `tokenizer` (not spelt in bytes)."""
  specials = [o200k.SPECIAL_IDS[name] for name in (o200k.START, o200k.END, o200k.MESSAGE,
                                                   o200k.CHANNEL, o200k.RETURN, o200k.CALL)]
  return all(int(n) == 1 for n in tokenizer.model_lengths(specials))


def stop_ids(tokenizer) -> tuple[int, ...]:
  """STOP_IDS as `tokenizer`'s model ids (a compact vocabulary numbers them differently)."""
  return tuple(int(i) for i in tokenizer.from_base_ids(list(STOP_IDS)))


def system_text(reasoning_effort: str = "medium", current_date: str | None = None,
                has_functions: bool = False) -> str:
  """The text of harmony's default system message."""
  if reasoning_effort not in REASONING_EFFORTS:
    raise HarmonyError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                       f"got {reasoning_effort!r}")
  lines = [IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
  if current_date is not None:
    lines.append(f"Current date: {current_date}")
  channels = (f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every "
              "message." + (f"\n{harmony_tools.CHANNEL_RULE}" if has_functions else ""))
  return "\n".join(lines) + f"\n\nReasoning: {reasoning_effort}\n\n" + channels


def _message(role, content, channel=None, *, name=None, recipient=None, content_type=None):
  return {"role": role, "name": name, "recipient": recipient, "channel": channel,
          "content_type": content_type, "content": content}


def _text(message: dict, i: int, key: str = "content") -> str:
  """A message's text: a string, None (empty), or OpenAI's list of {"type": "text"} parts."""
  value = message.get(key)
  if value is None:
    return ""
  if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                     and isinstance(p.get("text"), str) for p in value):
    return "".join(p["text"] for p in value)
  if not isinstance(value, str):
    raise HarmonyError(f"message {i} needs its {key} as a string, got {message!r}")
  return value


def _json_text(value) -> str:
  """Tool arguments and results: a string as given, anything else as compact JSON."""
  return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                         separators=(",", ":"))


def _tool_call(message: dict, i: int) -> tuple[str, str, str | None]:
  """(function name, arguments text, call id) of an assistant message's one tool call."""
  calls = message["tool_calls"]
  if not isinstance(calls, list) or len(calls) != 1:
    raise HarmonyError(f"message {i}: harmony stops sampling at each tool call, so an assistant "
                       "message holds exactly one; split parallel calls into assistant and tool "
                       f"messages in turn (got tool_calls={calls!r})")
  call = calls[0]
  function = call.get("function", call) if isinstance(call, dict) else None
  if not isinstance(function, dict) or not isinstance(function.get("name"), str):
    raise HarmonyError(f"message {i}: a tool call needs {{'function': {{'name': ..., "
                       f"'arguments': ...}}}}, got {call!r}")
  return function["name"], _json_text(function.get("arguments") or {}), call.get("id")


def _qualified(name: str) -> str:
  return name if "." in name else f"{harmony_tools.NAMESPACE}.{name}"


def turn_messages(messages) -> list[tuple[int, dict]]:
  """(index in `messages`, harmony message) of every turn; system/developer messages aside."""
  if not isinstance(messages, (list, tuple)):
    raise HarmonyError("messages must be a list of {'role': ..., 'content': ...} dicts")
  turns, call_names, last_call = [], {}, None
  for i, message in enumerate(messages):
    role = message.get("role") if isinstance(message, dict) else None
    if role not in ROLES:
      raise HarmonyError(f"message {i} needs a role among {', '.join(ROLES)}, got {message!r}")
    channel = message.get("channel")
    if channel is not None and (role != "assistant" or channel not in CHANNELS):
      raise HarmonyError(f"message {i}: only assistant messages take a channel, one of "
                         f"{', '.join(CHANNELS)}; got {channel!r}")
    if role == "user":
      turns.append((i, _message("user", _text(message, i))))
    elif role == "tool":
      name = message.get("name") or call_names.get(message.get("tool_call_id")) or last_call
      if not isinstance(name, str):
        raise HarmonyError(f"message {i} (role tool) needs its function's name: a 'name' key, "
                           "or an assistant tool call before it")
      content = message.get("content")
      result = _text(message, i) if content is None or isinstance(content, (str, list)) else (
          _json_text(content))  # a structured result as JSON
      turns.append((i, _message("tool", result, "commentary", name=_qualified(name),
                                recipient="assistant")))
    elif role == "assistant" and channel is not None:
      turns.append((i, _message("assistant", _text(message, i), channel)))
    elif role == "assistant":
      text = _text(message, i)
      thinking = _text(message, i, "thinking")
      if thinking:
        turns.append((i, _message("assistant", thinking, "analysis")))
      if not message.get("tool_calls"):
        turns.append((i, _message("assistant", text, "final")))
        continue
      name, arguments, call_id = _tool_call(message, i)
      if text:  # shown to the user before the call: harmony's preamble
        turns.append((i, _message("assistant", text, "commentary")))
      turns.append((i, _message("assistant", arguments, "commentary", recipient=_qualified(name),
                                content_type=CALL_CONTENT_TYPE)))
      last_call = call_names[call_id] = name
  return turns


def drop_finished_analysis(turns: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
  """turn_messages' pairs without the analysis before the last `final` message: the reasoning
  of answered turns is never shown to the model again."""
  finals = [j for j, (_, message) in enumerate(turns) if message["channel"] == "final"]
  return [(i, message) for j, (i, message) in enumerate(turns)
          if not (finals and j < finals[-1] and message["channel"] == "analysis")]


def header_messages(messages, *, reasoning_effort: str = "medium",
                    current_date: str | None = None, tools=None) -> list[dict]:
  """Harmony's system message and, when there are instructions or tools, the developer one."""
  instructions = [_text(m, i) for i, m in enumerate(messages)
                  if isinstance(m, dict) and m.get("role") in INSTRUCTION_ROLES]
  try:
    specs = [harmony_tools.function_spec(tool, f"tool {i}") for i, tool in enumerate(tools or [])]
  except harmony_tools.ToolSpecError as problem:
    raise HarmonyError(str(problem)) from None
  sections = (["# Instructions", "\n\n".join(instructions)] if instructions else []) + (
      [harmony_tools.tools_section(specs)] if specs else [])
  result = [_message("system", system_text(reasoning_effort, current_date, bool(specs)))]
  if sections:
    result.append(_message("developer", "\n\n".join(sections)))
  return result


def harmony_messages(messages, *, reasoning_effort: str = "medium",
                     current_date: str | None = None, tools=None) -> list[dict]:
  """OpenAI-style chat messages as harmony messages: {"role", "name", "recipient", "channel",
  "content_type", "content"} (None where a message has no such part)."""
  turns = [message for _, message in drop_finished_analysis(turn_messages(messages))]
  return header_messages(messages, reasoning_effort=reasoning_effort, current_date=current_date,
                         tools=tools) + turns


def require_harmony(tokenizer=None):
  """`tokenizer` (o200k_harmony's full one if None), refused if it spells harmony's tokens."""
  tokenizer = tokenizer or _full_tokenizer()
  if not supports_harmony(tokenizer):
    raise HarmonyError("this tokenizer lacks harmony's special tokens (a compact vocabulary); "
                       "use plain-text mode")
  return tokenizer


def render_base(harmony: list[dict], encode) -> list[int]:
  """o200k_harmony ids of harmony messages; each text piece is encoded on its own, as harmony
  does (so a role never merges with the text after it)."""
  base = []
  for m in harmony:
    base += [_START, *encode(m["name"] if m["role"] == "tool" else m["role"])]
    if m["recipient"] is not None and m["recipient"] != "all":
      base += encode(f" to={m['recipient']}")
    if m["channel"] is not None:
      base += [_CHANNEL, *encode(m["channel"])]
    if m["content_type"] is not None and m["content_type"].startswith(o200k.CONSTRAIN):
      base += [*encode(" "), _CONSTRAIN, *encode(m["content_type"][len(o200k.CONSTRAIN):])]
    elif m["content_type"] is not None:
      base += encode(f" {m['content_type']}")
    calls = m["role"] == "assistant" and m["recipient"] is not None
    base += [_MESSAGE, *encode(m["content"]), _CALL if calls else _END]
  return base


def render_chat(messages, *, tokenizer=None, reasoning_effort: str = "medium",
                current_date: str | None = None, add_generation_prompt: bool = True,
                tools=None) -> list[int]:
  """The conversation's ids (the tokenizer's; o200k_harmony by default), ready to complete.

  With `add_generation_prompt` the ids end with `<|start|>assistant`: the model writes the
  channel and the message next.
  """
  tokenizer = require_harmony(tokenizer)
  encode = tokenizer.encoding.encode_ordinary  # text only: special-token strings stay text
  base = render_base(harmony_messages(messages, reasoning_effort=reasoning_effort,
                                      current_date=current_date, tools=tools), encode)
  if add_generation_prompt:
    base += [_START, *encode("assistant")]
  return tokenizer.from_base_ids(base).tolist()


def _parse_header(text: str) -> tuple[str, str | None]:
  """(role, channel) of a header such as `assistant<|channel|>final` (role may be omitted)."""
  role, _, channel = text.partition(o200k.CHANNEL)
  channel = channel.split(o200k.CONSTRAIN)[0].split(" ")[0] if channel else None
  return role.split(" ")[0] or "assistant", channel or None


def parse_chat(ids, *, tokenizer=None) -> list[dict]:
  """Generated ids (after `<|start|>assistant`) as messages {"role", "channel", "content"}.

  A message cut off by the end of a stream (no `<|end|>` / `<|return|>` / `<|call|>` yet)
  still comes back, with the text so far.
  """
  tokenizer = tokenizer or _full_tokenizer()
  base = [int(i) for i in tokenizer.to_base_ids(list(ids))]
  decode = lambda part: tokenizer.encoding.decode_bytes(part).decode("utf-8", errors="replace")
  messages, i = [], 0
  while i < len(base):
    if base[i] == _START:
      i += 1
    header_end = base.index(_MESSAGE, i) if _MESSAGE in base[i:] else len(base)
    role, channel = _parse_header(decode(base[i:header_end]))
    if header_end == len(base):
      break  # the stream ended inside a header: no message text yet
    end = next((j for j in range(header_end + 1, len(base)) if base[j] in _MESSAGE_ENDS),
               len(base))
    messages.append({"role": role, "channel": channel,
                     "content": decode(base[header_end + 1:end])})
    i = end + 1
  return messages


class StreamParser:
  """parse_chat, fed one id at a time: says which channel the text of each new id belongs to.

  Only the current message's ids are re-parsed per id (a finished message is never looked at
  again), so a long stream costs the length of its messages, not of the whole stream, per id.
  """

  def __init__(self, tokenizer=None):
    self.tokenizer = tokenizer or _full_tokenizer()
    self.ids: list[int] = []  # the ids of the message being generated
    self._sent = ""  # its content already reported

  def feed(self, token: int) -> list[tuple[str | None, str]]:
    """(channel, new text) pieces that this id completed; text that is still a partial UTF-8
    character waits for the next id."""
    self.ids.append(int(token))
    pieces = []
    for message in parse_chat(self.ids, tokenizer=self.tokenizer):
      text = message["content"].rstrip("\ufffd")
      if len(text) > len(self._sent):
        pieces.append((message["channel"], text[len(self._sent):]))
        self._sent = text
    if any(int(b) in _MESSAGE_ENDS for b in self.tokenizer.to_base_ids([int(token)])):
      self.ids, self._sent = [], ""
    return pieces
