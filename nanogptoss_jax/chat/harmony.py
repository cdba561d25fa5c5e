"""OpenAI's harmony chat format for gpt-oss, in plain Python over our tokenizer.

A conversation renders as `<|start|>{role}[<|channel|>{channel}]<|message|>{text}<|end|>` per
message: first harmony's default `system` message (identity, knowledge cutoff, date, reasoning
effort, the valid channels), then a `developer` message holding the chat's system messages as
`# Instructions`, then the turns. Assistant turns go on the `final` channel unless they name
another; once the conversation holds a later `final` answer, the `analysis` (chain of thought)
of the turns before it is dropped, as harmony's own renderer does. Generation stops on
`<|return|>` (the answer is done) or `<|call|>` (a tool call).
"""

from nanogptoss_jax import o200k

REASONING_EFFORTS = ("low", "medium", "high")
CHANNELS = ("analysis", "commentary", "final")
ROLES = ("system", "user", "assistant")
STOP_IDS = (o200k.SPECIAL_IDS[o200k.RETURN], o200k.SPECIAL_IDS[o200k.CALL])
IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"

_START, _END, _MESSAGE, _CHANNEL, _CONSTRAIN = (
    o200k.SPECIAL_IDS[name] for name in (o200k.START, o200k.END, o200k.MESSAGE, o200k.CHANNEL,
                                         o200k.CONSTRAIN))
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


def system_text(reasoning_effort: str = "medium", current_date: str | None = None) -> str:
  """The text of harmony's default system message."""
  if reasoning_effort not in REASONING_EFFORTS:
    raise HarmonyError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
                       f"got {reasoning_effort!r}")
  lines = [IDENTITY, f"Knowledge cutoff: {KNOWLEDGE_CUTOFF}"]
  if current_date is not None:
    lines.append(f"Current date: {current_date}")
  return ("\n".join(lines) + f"\n\nReasoning: {reasoning_effort}\n\n"
          f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message.")


def _check_messages(messages) -> None:
  if not isinstance(messages, (list, tuple)):
    raise HarmonyError("messages must be a list of {'role': ..., 'content': ...} dicts")
  for i, message in enumerate(messages):
    if not isinstance(message, dict) or message.get("role") not in ROLES:
      raise HarmonyError(f"message {i} needs a role among {', '.join(ROLES)}, got {message!r}")
    if not isinstance(message.get("content"), str):
      raise HarmonyError(f"message {i} needs its content as a string, got {message!r}")
    channel = message.get("channel")
    if channel is not None and (message["role"] != "assistant" or channel not in CHANNELS):
      raise HarmonyError(f"message {i}: only assistant messages take a channel, one of "
                         f"{', '.join(CHANNELS)}; got {channel!r}")


def harmony_messages(messages, *, reasoning_effort: str = "medium",
                     current_date: str | None = None) -> list[dict]:
  """OpenAI-style chat messages as harmony messages: {"role", "channel" or None, "content"}."""
  _check_messages(messages)
  result = [{"role": "system", "channel": None,
             "content": system_text(reasoning_effort, current_date)}]
  instructions = [m["content"] for m in messages if m["role"] == "system"]
  if instructions:
    result.append({"role": "developer", "channel": None,
                   "content": "# Instructions\n\n" + "\n\n".join(instructions)})
  turns = [{"role": m["role"], "content": m["content"],
            "channel": m.get("channel") or "final" if m["role"] == "assistant" else None}
           for m in messages if m["role"] != "system"]
  assistant = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
  if assistant and turns[assistant[-1]]["channel"] == "final":
    last_final = assistant[-1]
    turns = [m for i, m in enumerate(turns) if not (i < last_final and m["channel"] == "analysis")]
  return result + turns


def render_chat(messages, *, tokenizer=None, reasoning_effort: str = "medium",
                current_date: str | None = None, add_generation_prompt: bool = True) -> list[int]:
  """The conversation's ids (the tokenizer's; o200k_harmony by default), ready to complete.

  With `add_generation_prompt` the ids end with `<|start|>assistant`: the model writes the
  channel and the message next.
  """
  tokenizer = tokenizer or _full_tokenizer()
  if not supports_harmony(tokenizer):
    raise HarmonyError("this tokenizer lacks harmony's special tokens (a compact vocabulary); "
                       "use plain-text mode")
  encode = tokenizer.encoding.encode_ordinary  # harmony encodes each piece on its own
  base = []
  for message in harmony_messages(messages, reasoning_effort=reasoning_effort,
                                  current_date=current_date):
    base += [_START, *encode(message["role"])]
    if message["channel"] is not None:
      base += [_CHANNEL, *encode(message["channel"])]
    base += [_MESSAGE, *encode(message["content"]), _END]
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
