"""Conversations -> training examples: harmony ids, trained on exactly what the model samples.

The trained span of a conversation is everything after its prompt's last `<|start|>assistant`:
the turn's `<|channel|>analysis<|message|>...<|end|>`, each inner `<|start|>assistant` header,
`<|channel|>final<|message|>...` and the closing `<|return|>` (or, for a tool call,
` to=functions.f<|channel|>commentary <|constrain|>json<|message|>...<|call|>`). The prompt is
the conversation before that turn as harmony renders history (chat/harmony.py): the analysis of
answered turns dropped. tests/test_chat_data.py proves both against openai-harmony.
"""

import numpy as np

from nanogptoss_jax import o200k
from nanogptoss_jax.chat import harmony
from nanogptoss_jax.data.chat import ChatDataConfig, ChatDataError, ChatExample, read_splits
from nanogptoss_jax.data.chat_batches import fit_to_context

_START, _RETURN = o200k.SPECIAL_IDS[o200k.START], o200k.SPECIAL_IDS[o200k.RETURN]


def _ends_turn(message: dict) -> bool:
  """Whether an assistant message ends a sampled turn: OpenAI-form messages always do (a final
  answer or a tool call); a message naming its harmony channel does when that is `final`."""
  return message.get("channel") is None or message["channel"] == "final"


def _turn_start(messages) -> int:
  """Index of the first message of the trailing assistant turn."""
  start = len(messages) - 1
  while start > 0 and messages[start - 1].get("role") == "assistant" and not _ends_turn(
      messages[start - 1]):
    start -= 1
  return start


def render_for_training(messages, *, tokenizer=None, reasoning_effort: str = "medium",
                        current_date: str | None = None, tools=None) -> ChatExample:
  """The conversation up to its last assistant turn as model ids, and where that turn's
  sampled ids begin; the conversation must end with that turn."""
  tokenizer = harmony.require_harmony(tokenizer)
  if not isinstance(messages, (list, tuple)) or not messages or not isinstance(
      messages[-1], dict) or messages[-1].get("role") != "assistant":
    raise harmony.HarmonyError("a conversation to train on must end with the assistant turn "
                               "to learn (its last message has the role assistant)")
  start = _turn_start(messages)
  turns = harmony.turn_messages(messages)
  history = [(i, m) for i, m in turns if i < start]
  sampled = [m for i, m in turns if i >= start]
  if sampled[-1]["channel"] != "final" and sampled[-1]["recipient"] is None:
    raise harmony.HarmonyError("the trained assistant turn must end with a final answer or a "
                               f"tool call, not a {sampled[-1]['channel']} message")
  encode = tokenizer.encoding.encode_ordinary
  header = harmony.header_messages(messages, reasoning_effort=reasoning_effort,
                                   current_date=current_date, tools=tools)
  generation_prompt = [_START, *encode("assistant")]
  prompt = harmony.render_base(
      header + [m for _, m in harmony.drop_finished_analysis(history)], encode) + generation_prompt
  turn = harmony.render_base(sampled, encode)
  assert turn[:len(generation_prompt)] == generation_prompt  # every turn opens as the prompt ends
  turn = turn[len(generation_prompt):]
  if sampled[-1]["channel"] == "final":
    turn[-1] = _RETURN  # the model ends its answer with <|return|>; history shows <|end|>
  ids = tokenizer.from_base_ids(np.asarray(prompt + turn, np.int64)).astype(np.int32)
  trained_from = int(np.sum(tokenizer.model_lengths(np.asarray(prompt, np.int64))))
  return ChatExample(ids, trained_from)


def turn_ends(messages) -> list[int]:
  """Indices of the messages that end each assistant turn."""
  return [i for i, m in enumerate(messages)
          if isinstance(m, dict) and m.get("role") == "assistant" and _ends_turn(m)]


def conversation_examples(conversation: dict, tokenizer, cfg: ChatDataConfig) -> list[ChatExample]:
  """A read conversation (data/chat.py) as its examples: the last turn, or every turn."""
  messages = conversation["messages"]
  options = dict(tokenizer=tokenizer, reasoning_effort=conversation["reasoning_effort"],
                 current_date=cfg.current_date or None, tools=conversation["tools"])
  try:
    ends = turn_ends(messages)
    if not ends:
      raise harmony.HarmonyError("it has no assistant turn to train on")
    if cfg.train_turns == "last":
      return [render_for_training(messages, **options)]
    if ends[-1] != len(messages) - 1:
      raise harmony.HarmonyError("it must end with an assistant turn")
    return [render_for_training(messages[:end + 1], **options) for end in ends]
  except harmony.HarmonyError as problem:
    raise ChatDataError(f"{conversation['where']}: {problem}") from None


def prepare_chat_examples(cfg: ChatDataConfig, tokenizer, context_len: int
                          ) -> tuple[list[ChatExample], list[ChatExample]]:
  """(training, validation) examples of cfg's conversations, fit to context_len + 1 ids."""
  harmony.require_harmony(tokenizer)
  train, val = read_splits(cfg)
  examples = []
  for split, conversations in (("training", train), ("validation", val)):
    rendered = [e for c in conversations for e in conversation_examples(c, tokenizer, cfg)]
    examples.append(fit_to_context(rendered, context_len, cfg.too_long,
                                   f"{cfg.path} {split} conversations"))
  return examples[0], examples[1]
