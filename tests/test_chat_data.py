"""Chat data: harmony training examples proven against openai-harmony, padded batches, sources.

The oracle for every rendered id is openai-harmony 0.0.8 (OpenAI's renderer, Rust inside). Our
history rule differs from 0.0.8's in documented cases only: see the two tests after the
property test.
"""

import json
import logging
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from nanogptoss_jax.chat import examples as chat_examples
from nanogptoss_jax.chat import harmony
from nanogptoss_jax.data import chat_batches
from nanogptoss_jax.data.chat import ChatDataConfig, ChatDataError, ChatExample
from nanogptoss_jax.data.config import DataUnavailableError
from nanogptoss_jax.data.tokenizer import (FullTokenizer, build_compact_tokenizer, count_base_ids,
                                           fixed_base_ids)

# conftest points tiktoken at an offline copy of shared/tiktoken; harmony's Rust reads the same.
os.environ.setdefault("TIKTOKEN_RS_CACHE_DIR", os.environ.get("TIKTOKEN_CACHE_DIR", ""))
oh = pytest.importorskip("openai_harmony")

NO_DROP = oh.RenderConversationConfig(auto_drop_analysis=False)


@pytest.fixture(scope="module")
def encoding():
  return oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)


@pytest.fixture(scope="module")
def full():
  return FullTokenizer()


# --- The oracle: each OpenAI-form message as openai-harmony's own Message, per harmony's docs.

def _json(value) -> str:
  return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False,
                                                         separators=(",", ":"))


def _oracle_turns(messages) -> list:
  A, out, names = oh.Role.ASSISTANT, [], {}
  for m in messages:
    if m["role"] == "user":
      out.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
    elif m["role"] == "tool":
      name = m.get("name") or names[m["tool_call_id"]]
      out.append(oh.Message.from_author_and_content(
          oh.Author.new(oh.Role.TOOL, f"functions.{name}"), _json(m["content"]))
                 .with_recipient("assistant").with_channel("commentary"))
    elif m["role"] == "assistant" and "channel" in m:
      out.append(oh.Message.from_role_and_content(A, m["content"]).with_channel(m["channel"]))
    elif m["role"] == "assistant":
      if m.get("thinking"):
        out.append(oh.Message.from_role_and_content(A, m["thinking"]).with_channel("analysis"))
      if not m.get("tool_calls"):
        out.append(oh.Message.from_role_and_content(A, m["content"]).with_channel("final"))
        continue
      call = m["tool_calls"][0]
      names[call["id"]] = call["function"]["name"]
      if m.get("content"):  # a preamble: commentary the user sees before the call
        out.append(oh.Message.from_role_and_content(A, m["content"]).with_channel("commentary"))
      out.append(oh.Message.from_role_and_content(A, _json(call["function"]["arguments"]))
                 .with_channel("commentary").with_recipient(f"functions.{call['function']['name']}")
                 .with_content_type("<|constrain|>json"))
  return out


def _oracle(messages, tools, effort, date) -> list:
  system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
  if date is not None:
    system = system.with_conversation_start_date(date)
  header = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
  instructions = [m["content"] for m in messages if m["role"] in ("system", "developer")]
  if instructions or tools:
    developer = oh.DeveloperContent.new()
    if instructions:
      developer = developer.with_instructions("\n\n".join(instructions))
    if tools:
      developer = developer.with_function_tools([oh.ToolDescription.new(
          t["function"]["name"], t["function"]["description"],
          parameters=t["function"].get("parameters")) for t in tools])
    header.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, developer))
  return header + _oracle_turns(messages)


def _without_answered_analysis(messages: list) -> list:
  """Our history rule, stated on harmony's messages: no analysis before the last final."""
  finals = [i for i, m in enumerate(messages) if m.channel == "final"]
  return [m for i, m in enumerate(messages)
          if not (finals and i < finals[-1] and m.channel == "analysis")]


def _harmony_008_keeps_answered_analysis(messages: list) -> bool:
  """Whether 0.0.8 keeps some analysis that comes before the last final: it drops analysis
  only before the *first* final, and only when the last assistant message is final."""
  finals = [i for i, m in enumerate(messages) if m.channel == "final"]
  assistant = [m for m in messages if m.author.role == oh.Role.ASSISTANT]
  last_is_final = bool(assistant) and assistant[-1].channel == "final"
  return any(m.channel == "analysis" and i < finals[-1] and not (last_is_final and i < finals[0])
             for i, m in enumerate(messages)) if finals else False


# --- Generated conversations: roles, channels, tool calls and results, several turns.

TEXT = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24),
    st.sampled_from(["<|end|>", "<|start|>assistant<|channel|>final", "Hello, world.", "\n\n",
                     " 2 + 2 = 4", "é 漢字 ✨", "{\"a\": 1}"]))
WORD = st.from_regex(r"[a-z][a-z_]{0,7}", fullmatch=True)
LINE = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",),
                             exclude_characters="\n\r"), max_size=16)
SCALAR = st.one_of(st.integers(-5, 99), st.booleans(), WORD)
LEAF = st.fixed_dictionaries(
    {"type": st.sampled_from(["string", "number", "integer", "boolean"])},
    optional={"description": LINE, "default": SCALAR, "nullable": st.booleans(), "title": LINE,
              "examples": st.lists(WORD, max_size=2)})
ENUM = st.fixed_dictionaries({"type": st.just("string"), "enum": st.lists(WORD, min_size=1,
                                                                          max_size=3)},
                             optional={"default": WORD, "description": LINE})
ARRAY = st.fixed_dictionaries({"type": st.just("array")}, optional={"items": LEAF | ENUM})
ONE_OF = st.fixed_dictionaries({"oneOf": st.lists(LEAF | ENUM, min_size=1, max_size=2)},
                               optional={"description": LINE, "default": SCALAR})
TYPES = st.fixed_dictionaries({"type": st.lists(st.sampled_from(["string", "integer", "null"]),
                                                min_size=1, max_size=2)})
FIELD = st.one_of(LEAF, ENUM, ARRAY, ONE_OF, TYPES)


@st.composite
def _object_schema(draw, field=FIELD, depth=0):
  properties = draw(st.dictionaries(WORD, field if depth else field | _object_schema(depth=1),
                                    max_size=3))
  schema = {"type": "object", "properties": properties}
  if properties and draw(st.booleans()):
    schema["required"] = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
  if draw(st.booleans()):
    schema["description"] = draw(LINE)
  return schema


TOOL = st.builds(lambda name, description, parameters: {"type": "function", "function": dict(
    name=name, description=description, **({} if parameters is None else
                                           {"parameters": parameters}))},
                 WORD, TEXT, st.none() | _object_schema())
ARGUMENTS = st.dictionaries(WORD, SCALAR, max_size=3) | st.just('{"raw": "json text"}')


@st.composite
def conversations(draw):
  """(messages, tools, effort, date, number of trailing messages in the trained turn)."""
  tools = draw(st.lists(TOOL, max_size=2, unique_by=lambda t: t["function"]["name"]))
  names = [t["function"]["name"] for t in tools] or ["lookup"]
  messages = [{"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)}
              for _ in range(draw(st.integers(0, 2)))]
  trained = 0
  for _ in range(draw(st.integers(1, 3))):
    messages.append({"role": "user", "content": draw(TEXT)})
    for _ in range(draw(st.integers(0, 2))):  # tool rounds before the answer
      call_id = f"call_{len(messages)}"
      call = {"role": "assistant", "tool_calls": [{"type": "function", "id": call_id, "function": {
          "name": draw(st.sampled_from(names)), "arguments": draw(ARGUMENTS)}}]}
      for key in ("thinking", "content"):
        if draw(st.booleans()):
          call[key] = draw(TEXT)
      messages.append(call)
      trained = 1
      if draw(st.integers(0, 4)) == 0:
        return messages, tools, draw(st.sampled_from(harmony.REASONING_EFFORTS)), None, trained
      by_name = draw(st.booleans())
      messages.append({"role": "tool", "content": draw(TEXT | st.dictionaries(WORD, SCALAR)),
                       **({"name": call["tool_calls"][0]["function"]["name"]} if by_name
                          else {"tool_call_id": call_id})})
    if draw(st.booleans()):  # OpenAI form: thinking + content
      answer = {"role": "assistant", "content": draw(TEXT)}
      if draw(st.booleans()):
        answer["thinking"] = draw(TEXT)
      answers = [answer]
    else:  # harmony form: messages naming their channels
      channels = draw(st.lists(st.sampled_from(["analysis", "commentary"]), max_size=2))
      answers = [{"role": "assistant", "channel": c, "content": draw(TEXT)}
                 for c in channels + ["final"]]
    messages += answers
    trained = len(answers)
  date = draw(st.none() | st.sampled_from(["2025-06-28", "2026-01-01"]))
  return messages, tools, draw(st.sampled_from(harmony.REASONING_EFFORTS)), date, trained


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversations())
def test_trained_span_and_prompt_equal_openai_harmony(encoding, full, conversation):
  messages, tools, effort, date, trained = conversation
  ours = chat_examples.render_for_training(messages, tokenizer=full, reasoning_effort=effort,
                                           current_date=date, tools=tools)
  history = _oracle(messages[:-trained], tools, effort, date)
  whole = _oracle(messages, tools, effort, date)
  # With no history rule at all, harmony's training render extends its completion prompt; the
  # trained span is what it adds: the turn after the prompt's last <|start|>assistant.
  prompt = encoding.render_conversation_for_completion(
      oh.Conversation.from_messages(history), oh.Role.ASSISTANT, NO_DROP)
  training = encoding.render_conversation_for_training(oh.Conversation.from_messages(whole),
                                                       NO_DROP)
  assert training[:len(prompt)] == prompt
  span = training[len(prompt):]
  assert ours.ids[ours.trained_from:].tolist() == span
  # The weights select exactly that span, as targets.
  row = chat_batches.example_row(ours, len(ours.ids) - 1)
  assert row["targets"][row["weights"] > 0].tolist() == span
  # The prompt: harmony's rendering of the history with the analysis of answered turns dropped.
  assert ours.ids[:ours.trained_from].tolist() == encoding.render_conversation_for_completion(
      oh.Conversation.from_messages(_without_answered_analysis(history)), oh.Role.ASSISTANT,
      NO_DROP)
  # Harmony's own default rule agrees except where 0.0.8 keeps analysis of answered turns.
  default = encoding.render_conversation_for_completion(oh.Conversation.from_messages(history),
                                                        oh.Role.ASSISTANT)
  agrees = default == ours.ids[:ours.trained_from].tolist()
  event("prompt equals harmony 0.0.8's default" if agrees else "0.0.8 keeps answered analysis")
  assert agrees or _harmony_008_keeps_answered_analysis(history)


def test_harmony_default_training_render_drops_the_trained_reasoning(encoding, full):
  # Why the oracle above renders with auto_drop_analysis=False: 0.0.8's default drops every
  # analysis before the first final, the reasoning of the very turn being trained included.
  messages = [{"role": "user", "content": "2+2?"},
              {"role": "assistant", "thinking": "Add them.", "content": "4"}]
  ours = chat_examples.render_for_training(messages, tokenizer=full)
  trained = full.decode(ours.ids[ours.trained_from:])
  assert trained == ("<|channel|>analysis<|message|>Add them.<|end|><|start|>assistant"
                     "<|channel|>final<|message|>4<|return|>")
  default = encoding.render_conversation_for_training(
      oh.Conversation.from_messages(_oracle(messages, [], "medium", None)))
  assert "Add them." not in encoding.decode(default)


def test_answered_analysis_between_two_finals_is_dropped(encoding, full):
  # harmony's docs: drop the reasoning of turns that ended in a final answer. 0.0.8 drops only
  # what precedes the *first* final (openai/harmony PR #96), so it keeps "Second thought."
  messages = [{"role": "user", "content": "a"},
              {"role": "assistant", "thinking": "First thought.", "content": "A"},
              {"role": "user", "content": "b"},
              {"role": "assistant", "thinking": "Second thought.", "content": "B"},
              {"role": "user", "content": "c"}]
  ours = full.decode(harmony.render_chat(messages, tokenizer=full))
  theirs = encoding.decode(encoding.render_conversation_for_completion(
      oh.Conversation.from_messages(_oracle(messages, [], "medium", None)), oh.Role.ASSISTANT))
  assert "thought" not in ours and "First thought" not in theirs
  assert ours == theirs.replace("<|start|>assistant<|channel|>analysis<|message|>Second thought."
                                "<|end|>", "")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOOL, min_size=1, max_size=3, unique_by=lambda t: t["function"]["name"]),
       st.lists(TEXT, max_size=1))
@example([{"type": "function", "function": {"name": "f", "description": "a\r\nb\r"}}], [])
def test_function_tools_render_as_openai_harmony(encoding, full, tools, instructions):
  messages = [{"role": "developer", "content": text} for text in instructions] + [
      {"role": "user", "content": "Weather?"}]
  ours = harmony.render_chat(messages, tokenizer=full, tools=tools)
  theirs = encoding.render_conversation_for_completion(
      oh.Conversation.from_messages(_oracle(messages, tools, "medium", None)), oh.Role.ASSISTANT)
  assert ours == theirs, (full.decode(ours), encoding.decode(theirs))


def test_harmony_docs_function_example(encoding, full):
  # The developer message of harmony's docs (docs/format.md, "Defining available tools").
  tools = [{"type": "function", "function": {"name": "get_location",
                                             "description": "Gets the location of the user."}},
           {"type": "function", "function": {
               "name": "get_current_weather",
               "description": "Gets the current weather in the provided location.",
               "parameters": {"type": "object", "properties": {
                   "location": {"type": "string",
                                "description": "The city and state, e.g. San Francisco, CA"},
                   "format": {"type": "string", "enum": ["celsius", "fahrenheit"],
                              "default": "celsius"}}, "required": ["location"]}}}]
  text = full.decode(harmony.render_chat([{"role": "user", "content": "Hi"}], tokenizer=full,
                                         tools=tools))
  assert ("namespace functions {\n\n// Gets the location of the user.\ntype get_location = () "
          "=> any;\n\n// Gets the current weather in the provided location.\ntype "
          "get_current_weather = (_: {\n// The city and state, e.g. San Francisco, CA\nlocation: "
          "string,\nformat?: \"celsius\" | \"fahrenheit\", // default: celsius\n}) => any;\n\n} "
          "// namespace functions<|end|>") in text
  assert "Calls to these tools must go to the commentary channel: 'functions'.<|end|>" in text


# --- Batches: one conversation per row; the loss of a conversation alone equals its loss in a
# padded batch, and equals the loss over exactly its trained tokens (weights checked too).

CHATS = [
    [{"role": "user", "content": "Tell me a story about a cat."},
     {"role": "assistant", "thinking": "A cat story, short.", "content": "A cat sat. The end."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"},
     {"role": "assistant", "thinking": "Need a tool.", "tool_calls": [{"id": "1", "function": {
         "name": "weather", "arguments": {"city": "Paris"}}}]}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


@pytest.fixture(scope="module")
def compact(full):
  # Bytes, the named specials and a few dozen of the chats' ids: the rest is spelt in bytes.
  base = [i for chat in CHATS for i in chat_examples.render_for_training(chat, tokenizer=full).ids]
  return build_compact_tokenizer(count_base_ids(np.asarray(base)), 300)


def _nll(logits, targets):
  import jax
  log_probs = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  return -np.take_along_axis(np.asarray(log_probs), np.asarray(targets)[..., None], -1)[..., 0]


def test_a_conversations_loss_is_the_same_alone_and_in_a_padded_batch(compact):
  import jax.numpy as jnp
  from flax import nnx

  import nanogptoss_jax as ng
  cfg = ng.GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2,
                        vocab_size=compact.vocab_size, hidden_size=32, intermediate_size=24,
                        head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=4, rope_scaling_factor=1.0)
  model = ng.GptOss(cfg, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda model, tokens, positions: model.forward(tokens, positions).logits)
  examples = [chat_examples.render_for_training(chat, tokenizer=compact) for chat in CHATS]
  context_len = max(len(e.ids) for e in examples) + 7  # every row padded, the longest too
  batch = chat_batches.pad_batch(examples[::-1], context_len)
  logits = forward(model, jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]))
  batched = (_nll(logits, batch["targets"]) * batch["weights"]).sum(1) / batch["weights"].sum(1)
  for rendered, in_batch in zip(examples, batched[::-1]):
    # Alone: no padding, implied positions, the trained tokens picked by index, not by weights.
    ids = rendered.ids
    alone = _nll(forward(model, jnp.asarray(ids[None, :-1]), None), ids[None, 1:])[0]
    expected = alone[rendered.trained_from - 1:].mean()
    assert in_batch == pytest.approx(expected, rel=1e-5, abs=1e-6)


def _synthetic(n: int, length: int = 6) -> list[ChatExample]:
  """Examples whose first id names them."""
  return [ChatExample(np.arange(i * 100, i * 100 + length, dtype=np.int32), 2) for i in range(n)]


def _names(batch) -> list[int]:
  return [int(row[0]) // 100 if w.any() else -1
          for row, w in zip(batch["inputs"], batch["weights"])]


def test_train_iterator_resumes_exactly_shards_and_covers_each_epoch():
  examples, context_len = _synthetic(10), 8
  it = chat_batches.make_chat_train_iterator(examples, context_len, 4, seed=3)
  batches = [next(it) for _ in range(3)]
  state = it.get_state()
  json.dumps(state)  # a checkpoint stores it as JSON
  rest = [next(it) for _ in range(4)]
  resumed = chat_batches.make_chat_train_iterator(examples, context_len, 4, seed=3)
  resumed.set_state(state)
  for expected in rest:
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
  names = [n for b in batches + rest[:2] for n in _names(b)]  # 20 rows: two epochs
  assert sorted(names[:10]) == list(range(10)) and sorted(names[10:]) == list(range(10))
  assert names[:10] != names[10:]  # each epoch shuffled afresh
  for key, value in batches[0].items():
    assert value.shape == (4, context_len), key
  assert {k: v.dtype.name for k, v in batches[0].items()} == {
      "inputs": "int32", "targets": "int32", "weights": "float32", "positions": "int32"}
  shards = [chat_batches.make_chat_train_iterator(examples, context_len, 4, seed=3,
                                                  process_index=p, process_count=2)
            for p in range(2)]
  first = [next(s) for s in shards]
  for key in batches[0]:
    assert np.array_equal(np.concatenate([f[key] for f in first]), batches[0][key])


def test_val_batches_hold_every_example_once_then_padding():
  examples, context_len = _synthetic(5), 8
  batches = chat_batches.chat_val_batches(examples, context_len, 2)
  assert [_names(b) for b in batches] == [[0, 1], [2, 3], [4, -1]]
  padding = {k: v[1] for k, v in batches[-1].items()}
  assert (padding["positions"] == -1).all() and not padding["weights"].any()
  row = {k: v[0] for k, v in batches[0].items()}  # example 0: ids 0..5, trained from id 2
  assert row["inputs"].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
  assert row["targets"].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
  assert row["weights"].tolist() == [0, 1, 1, 1, 1, 0, 0, 0]
  assert row["positions"].tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
  halves = [chat_batches.chat_val_batches(examples, context_len, 2, process_index=p,
                                          process_count=2) for p in range(2)]
  assert [[_names(a)[0], _names(b)[0]] for a, b in zip(*halves)] == [[0, 1], [2, 3], [4, -1]]


def test_too_long_conversations_are_dropped_or_cut_and_counted(caplog):
  examples = [ChatExample(np.arange(n, dtype=np.int32), trained) for n, trained in
              ((5, 2), (9, 3), (12, 10), (9, 8))]  # context 6 fits 7 ids
  with caplog.at_level(logging.WARNING):
    kept = chat_batches.fit_to_context(examples, 6, "drop", "chats")
  assert [len(e.ids) for e in kept] == [5]
  assert "chats: 3 of 4 conversations are longer than context_len + 1 = 7 tokens: 3 dropped, " \
         "0 cut" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    kept = chat_batches.fit_to_context(examples, 6, "cut", "chats")
  # Cut where some trained token still fits (trained from 3 of 7); trained from 10 or 8: dropped.
  assert [(len(e.ids), e.trained_from) for e in kept] == [(5, 2), (7, 3)]
  assert "2 dropped, 1 cut" in caplog.text
  with pytest.raises(ChatDataError, match="every conversation is longer"):
    chat_batches.fit_to_context(examples[2:], 6, "drop", "chats")


# --- Sources: JSON Lines and `datasets` directories, a held-out split, bad input in one line.

def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def _chat(i: int) -> dict:
  return {"messages": [{"role": "user", "content": f"Question {i}?"},
                       {"role": "assistant", "thinking": f"Think {i}.", "content": f"Answer {i}."}]}


def test_jsonl_file_with_a_held_out_split(tmp_path, full):
  path = _write_jsonl(tmp_path / "chats.jsonl", [_chat(i) for i in range(10)])
  cfg = ChatDataConfig(path=path, val_split="", val_conversations=3)
  train, val = chat_examples.prepare_chat_examples(cfg, full, context_len=256)
  answers = lambda examples: {full.decode(e.ids[e.trained_from:]).split("Answer ")[1][0]
                              for e in examples}
  assert len(train) == 7 and len(val) == 3 and not answers(train) & answers(val)
  assert answers(train) | answers(val) == set("0123456789")
  with pytest.raises(DataUnavailableError, match="one file, so it is the training split only"):
    chat_examples.prepare_chat_examples(ChatDataConfig(path=path), full, 256)


def test_every_turn_is_trained_as_the_last_of_its_own_example(tmp_path, full):
  chat = CHATS[1]
  path = _write_jsonl(tmp_path / "train.jsonl", [{"messages": chat}])
  _write_jsonl(tmp_path / "validation.jsonl", [{"messages": chat}])
  cfg = ChatDataConfig(path=str(tmp_path), train_turns="all")
  train, _ = chat_examples.prepare_chat_examples(cfg, full, 512)
  assert [full.decode(e.ids[e.trained_from:]) for e in train] == [
      "<|channel|>final<|message|>Hello!<|return|>",
      "<|channel|>analysis<|message|>Need a tool.<|end|><|start|>assistant to=functions.weather"
      "<|channel|>commentary <|constrain|>json<|message|>{\"city\":\"Paris\"}<|call|>"]
  last = chat_examples.render_for_training(chat, tokenizer=full)
  assert train[1].ids.tolist() == last.ids.tolist() and os.path.exists(path)


def test_datasets_directory_in_multilingual_thinkings_layout(tmp_path, encoding, full):
  # HuggingFaceH4/Multilingual-Thinking's columns: the messages' structs carry `thinking`
  # (None on non-assistant messages), the system message holds the reasoning language.
  datasets = pytest.importorskip("datasets")
  rows = [{"reasoning_language": "French", "developer": "You are helpful.", "user": f"Hi {i}",
           "analysis": f"L'utilisateur dit bonjour {i}.", "final": f"Hello {i}!",
           "messages": [{"content": "reasoning language: French\n\nYou are helpful.",
                         "role": "system", "thinking": None},
                        {"content": f"Hi {i}", "role": "user", "thinking": None},
                        {"content": f"Hello {i}!", "role": "assistant",
                         "thinking": f"L'utilisateur dit bonjour {i}."}]} for i in range(6)]
  (tmp_path / "data").mkdir()
  parquet = tmp_path / "data" / "train-00000-of-00001.parquet"  # the hub's layout
  datasets.Dataset.from_list(rows).to_parquet(str(parquet))
  cfg = ChatDataConfig(path=str(tmp_path), val_split="", val_conversations=2)
  train, val = chat_examples.prepare_chat_examples(cfg, full, 512)
  assert len(train) == 4 and len(val) == 2
  messages = [{k: v for k, v in m.items() if v is not None} for m in rows[0]["messages"]]
  oracle = encoding.render_conversation_for_training(
      oh.Conversation.from_messages(_oracle(messages, [], "medium", None)), NO_DROP)
  assert train[0].ids.tolist() == oracle


BAD_ROWS = {
    "no assistant turn": ({"messages": [{"role": "user", "content": "hi"}]},
                          "row 0: it has no assistant turn to train on"),
    "unknown role": ({"messages": [{"role": "bot", "content": "hi"},
                                   {"role": "assistant", "content": "x"}]},
                     "row 0: message 0 needs a role among"),
    "no messages": ({"text": "hi"}, "row 0: expected an object with a non-empty 'messages'"),
    "two tool calls": ({"messages": [{"role": "user", "content": "hi"}, {
        "role": "assistant", "tool_calls": [{"function": {"name": "a"}},
                                            {"function": {"name": "b"}}]}]},
                       "holds exactly one"),
    "tool without a name": ({"messages": [{"role": "user", "content": "hi"},
                                          {"role": "tool", "content": "42"},
                                          {"role": "assistant", "content": "x"}]},
                            "message 1 (role tool) needs its function's name"),
    "ends with the user": ({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "x"},
                                         {"role": "user", "content": "more"}]},
                           "must end with the assistant turn"),
    "bad tool spec": ({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "x"}], "tools": [{"x": 1}]},
                      "tool 0: a tool must be"),
}


@pytest.mark.parametrize("name", BAD_ROWS)
def test_bad_conversations_are_refused_in_one_line(name, tmp_path, full):
  row, message = BAD_ROWS[name]
  path = _write_jsonl(tmp_path / "chats.jsonl", [row, _chat(1), _chat(2)])
  with pytest.raises(ChatDataError, match="^" + str(tmp_path).replace(".", r"\.")) as caught:
    chat_examples.prepare_chat_examples(ChatDataConfig(path=path, val_split="",
                                                       val_conversations=1), full, 256)
  assert message in str(caught.value) and "\n" not in str(caught.value)


def test_bad_files_and_settings_are_refused_in_one_line(tmp_path, full):
  path = tmp_path / "chats.jsonl"
  path.write_text(json.dumps(_chat(0)) + "\n{not json\n")
  with pytest.raises(ChatDataError, match="line 2 is not JSON"):
    chat_examples.prepare_chat_examples(ChatDataConfig(path=str(path), val_split=""), full, 64)
  with pytest.raises(ChatDataError, match="train_turns must be one of last, all"):
    ChatDataConfig(path=str(path), train_turns="every")
  from nanogptoss_jax.data.tokenizer import CompactTokenizer, byte_base_ids
  bare = CompactTokenizer(np.concatenate([byte_base_ids(), [199999, 200002]]))
  with pytest.raises(harmony.HarmonyError, match="lacks harmony's special tokens"):
    chat_examples.prepare_chat_examples(ChatDataConfig(path=str(path), val_split=""), bare, 64)


# --- The newcomer's data: TinyStories as harmony chats, and nano's vocabulary speaking harmony.

def test_story_chats_are_deterministic_held_out_and_about_their_story(tmp_path, tinystories_dir,
                                                                      full):
  from nanogptoss_jax.data import chat_stories
  from nanogptoss_jax.data.config import DataConfig
  from nanogptoss_jax.data.sources import load_split_texts
  build = lambda out, seed: chat_stories.write_story_chats(
      str(tinystories_dir), str(tmp_path / out), seed=seed, max_train=300, max_validation=60)
  counts = build("a", 0)
  build("b", 0)
  build("c", 1)
  read = lambda out, split: (tmp_path / out / f"{split}.jsonl").read_text()
  assert read("a", "train") == read("b", "train") and read("a", "train") != read("c", "train")
  stories = {split: set(load_split_texts(DataConfig(path=str(tinystories_dir), max_stories=n),
                                         split)) for split, n in (("train", 300),
                                                                  ("validation", 60))}
  for split in ("train", "validation"):
    rows = [json.loads(line) for line in read("a", split).splitlines()]
    assert len(rows) == counts[split]["conversations"] > 0.9 * counts[split]["stories"]
    for row in rows:
      ask, answer = row["messages"][-2:]
      assert ask["role"] == "user" and answer["role"] == "assistant"
      assert answer["content"] in stories[split]  # the held-out split tells unseen stories
      topic = ask["content"].split(" about ")[-1].split(" with ")[-1].rstrip(".?")
      topic = topic.replace(" in it", "").split(" and ")
      assert all(t.split()[-1] in answer["content"] for t in topic), (ask, answer["content"][:80])
      assert answer["thinking"].startswith("The user wants a story about")
  assert not stories["train"] & stories["validation"]
  train, val = chat_examples.prepare_chat_examples(
      ChatDataConfig(path=str(tmp_path / "a")), full, context_len=1024)
  assert len(train) == counts["train"]["conversations"] and len(val) == 60


def test_a_compact_vocabulary_writes_harmonys_headers_in_as_many_ids_as_the_full_one(full):
  # A vocabulary built from stories alone (no chat text in its counts) still spells
  # `<|start|>assistant<|channel|>final<|message|>` in 5 ids, not 17 byte ids: a small model
  # fine-tuned on a few hundred chats learns the header, where spelt in bytes it garbled it.
  stories_only = np.zeros(full.vocab_size, np.int64)
  stories_only[full.encode(" Once upon a time, a little dog ran.")] = 1
  compact = build_compact_tokenizer(stories_only, 300)
  for role in ("system", "developer", "user", "assistant"):
    for channel in ("analysis", "commentary", "final"):
      header = f"<|start|>{role}<|channel|>{channel}<|message|>"
      ids = compact.from_base_ids(np.asarray(full.encoding.encode(header, allowed_special="all")))
      reference = full.encoding.encode(header, allowed_special="all")
      assert len(ids) == len(reference) and compact.decode(ids) == header


def test_a_compact_vocabulary_holds_harmonys_tokens_and_stops_on_their_ids(full):
  # build_compact_tokenizer keeps every named special and harmony's header words, whatever the
  # counts: nano's 4,096 too.
  for size in (len(fixed_base_ids()), 4096):
    compact = build_compact_tokenizer(np.zeros(full.vocab_size, np.int64), size)
    assert harmony.supports_harmony(compact)
    stops = harmony.stop_ids(compact)
    assert max(stops) < size and compact.to_base_ids(list(stops)).tolist() == list(
        harmony.STOP_IDS)
    example = chat_examples.render_for_training(CHATS[0], tokenizer=compact)
    reference = chat_examples.render_for_training(CHATS[0], tokenizer=full)
    # Words outside the vocabulary are spelt in bytes: the same text, the same trained span.
    assert len(example.ids) > len(reference.ids)
    for ours, theirs in ((example.ids, reference.ids), (example.ids[example.trained_from:],
                                                        reference.ids[reference.trained_from:])):
      assert compact.decode(ours) == full.decode(theirs)
    assert harmony.parse_chat(example.ids[example.trained_from:], tokenizer=compact)[-1] == {
        "role": "assistant", "channel": "final", "content": "A cat sat. The end."}
