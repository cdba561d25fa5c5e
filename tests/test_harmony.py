"""Our harmony renderer and parser against OpenAI's own (openai-harmony, offline)."""

import os

import numpy as np
import pytest

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.data.tokenizer import CompactTokenizer, FullTokenizer, byte_base_ids

# conftest points tiktoken at an offline copy of shared/tiktoken; harmony's Rust reads the same.
os.environ.setdefault("TIKTOKEN_RS_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
oh = pytest.importorskip("openai_harmony")


@pytest.fixture(scope="module")
def encoding():
  return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def tokenizer():
  return FullTokenizer()


def _oracle_conversation(messages, effort, date):
  """The same conversation built with openai-harmony's own types, as its docs describe."""
  system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
  if date is not None:
    system = system.with_conversation_start_date(date)
  built = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
  instructions = [m["content"] for m in messages if m["role"] == "system"]
  if instructions:
    built.append(oh.Message.from_role_and_content(
        oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("\n\n".join(instructions))))
  for m in messages:
    if m["role"] == "user":
      built.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
    elif m["role"] == "assistant":
      built.append(oh.Message.from_role_and_content(oh.Role.ASSISTANT, m["content"])
                   .with_channel(m.get("channel", "final")))
  return oh.Conversation.from_messages(built)


CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello there."}],
    "system and user": [{"role": "system", "content": "Answer in French."},
                        {"role": "user", "content": "What is 2 + 2?"}],
    "two systems": [{"role": "system", "content": "Be terse."},
                    {"role": "system", "content": "Line one\nline two."},
                    {"role": "user", "content": "Hi"}],
    "earlier turns": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello! How can I help?"},
                      {"role": "user", "content": "Tell me a joke ✨ with unicode: é, 漢字."}],
    "earlier analysis is dropped": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "channel": "analysis", "content": "User greets. Respond."},
        {"role": "assistant", "channel": "final", "content": "Hello!"},
        {"role": "user", "content": "Again"}],
    "analysis after the last final stays": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "channel": "final", "content": "Hello!"},
        {"role": "user", "content": "Think first"},
        {"role": "assistant", "channel": "analysis", "content": "Let me think."}],
    "commentary": [{"role": "user", "content": "Go"},
                   {"role": "assistant", "channel": "commentary", "content": "Working on it."},
                   {"role": "assistant", "channel": "final", "content": "Done."},
                   {"role": "user", "content": "Thanks"}],
    "special text stays text": [{"role": "user", "content": "<|end|> is not a token here"}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("effort", harmony.REASONING_EFFORTS)
@pytest.mark.parametrize("date", [None, "2025-06-28"])
def test_render_equals_openai_harmony(name, effort, date, encoding, tokenizer):
  messages = CONVERSATIONS[name]
  ours = harmony.render_chat(messages, tokenizer=tokenizer, reasoning_effort=effort,
                             current_date=date)
  theirs = encoding.render_conversation_for_completion(
      _oracle_conversation(messages, effort, date), oh.Role.ASSISTANT)
  assert ours == list(theirs), (encoding.decode(ours), encoding.decode(theirs))


def test_without_generation_prompt_ends_with_the_last_message(tokenizer):
  messages = CONVERSATIONS["system and user"]
  full = harmony.render_chat(messages, tokenizer=tokenizer)
  bare = harmony.render_chat(messages, tokenizer=tokenizer, add_generation_prompt=False)
  assert full[:len(bare)] == bare and tokenizer.decode(full[len(bare):]) == "<|start|>assistant"
  assert tokenizer.decode(bare[-1:]) == "<|end|>"


def _completion(encoding, pieces):
  """Ids a model might emit after `<|start|>assistant`, built with harmony's special ids."""
  ids = []
  for piece in pieces:
    ids += ([encoding.encode(piece, allowed_special="all")[0]] if piece.startswith("<|")
            else encoding.encode(piece, allowed_special=set()))
  return ids


COMPLETIONS = {
    "final only": ["<|channel|>", "final", "<|message|>", "Four.", "<|return|>"],
    "analysis then final": ["<|channel|>", "analysis", "<|message|>", "2+2 is 4.", "<|end|>",
                            "<|start|>", "assistant", "<|channel|>", "final", "<|message|>",
                            "It is 4 — é.", "<|return|>"],
    "commentary call": ["<|channel|>", "commentary", "<|message|>", "{\"x\": 1}", "<|call|>"],
    "cut off mid-answer": ["<|channel|>", "analysis", "<|message|>", "Thinking", "<|end|>",
                           "<|start|>", "assistant", "<|channel|>", "final", "<|message|>",
                           "Partial answ"],
}


@pytest.mark.parametrize("name", COMPLETIONS)
def test_parse_equals_openai_harmony(name, encoding, tokenizer):
  ids = _completion(encoding, COMPLETIONS[name])
  ours = harmony.parse_chat(ids, tokenizer=tokenizer)
  theirs = [{"role": m.author.role.value, "channel": m.channel,
             "content": "".join(c.text for c in m.content)}
            for m in encoding.parse_messages_from_completion_tokens(ids, oh.Role.ASSISTANT,
                                                                      strict=False)]
  assert ours == theirs


def test_stream_parser_reports_each_channel_in_order(encoding, tokenizer):
  ids = _completion(encoding, COMPLETIONS["analysis then final"])
  parser = harmony.StreamParser(tokenizer)
  pieces = [piece for token in ids for piece in parser.feed(token)]
  by_channel = {}
  for channel, text in pieces:
    by_channel[channel] = by_channel.get(channel, "") + text
  assert by_channel == {"analysis": "2+2 is 4.", "final": "It is 4 — é."}


def test_stop_ids_are_harmonys(encoding):
  assert set(harmony.STOP_IDS) == set(encoding.stop_tokens_for_assistant_actions())


def test_compact_vocabulary_without_specials_is_refused():
  # Bytes and the two stop tokens a compact vocabulary must hold, but no harmony structure.
  compact = CompactTokenizer(np.concatenate([byte_base_ids(), [199999, 200002]]))
  assert not harmony.supports_harmony(compact)
  with pytest.raises(harmony.HarmonyError, match="plain-text"):
    harmony.render_chat([{"role": "user", "content": "hi"}], tokenizer=compact)


def test_bad_messages_are_refused(tokenizer):
  with pytest.raises(harmony.HarmonyError, match="reasoning_effort"):
    harmony.render_chat([{"role": "user", "content": "hi"}], tokenizer=tokenizer,
                        reasoning_effort="max")
  with pytest.raises(harmony.HarmonyError, match="role"):
    harmony.render_chat([{"role": "tool", "content": "hi"}], tokenizer=tokenizer)
