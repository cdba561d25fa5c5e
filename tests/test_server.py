"""The OpenAI-compatible server on a real uvicorn: the official client, batching, errors."""

import threading
import time

import numpy as np
import pytest
import requests

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.data.tokenizer import CompactTokenizer, FullTokenizer, byte_base_ids
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.serving import prefill
from nanogptoss_jax.serving.engine import Engine, Request
from tests.serving_helpers import serve, tiny_model

openai = pytest.importorskip("openai")
HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def full_tokenizer():
  return FullTokenizer()


@pytest.fixture(scope="module")
def harmony_server(full_tokenizer):
  model = tiny_model(full_tokenizer.vocab_size)
  with serve(model, full_tokenizer, slots=4) as (url, engine):
    yield url, engine, model


@pytest.fixture(scope="module")
def client(harmony_server):
  return openai.OpenAI(base_url=harmony_server[0] + "/v1", api_key="unused", max_retries=0)


def test_openai_client_non_stream_matches_the_sampler(client, harmony_server, full_tokenizer):
  _, _, model = harmony_server
  reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, seed=3,
                                         temperature=0.9)
  prompt = harmony.render_chat(HI, tokenizer=full_tokenizer)
  # The batched engine draws what the one-request sampler draws for the same seed.
  ids = generate(model, [prompt], 12, temperature=0.9, top_p=1.0, seed=3,
                 stop_tokens=list(harmony.STOP_IDS))[0]
  assert reply.usage.completion_tokens == len(ids)
  assert reply.usage.prompt_tokens == len(prompt)
  expected = harmony.parse_chat(ids, tokenizer=full_tokenizer)
  final = "".join(m["content"] for m in expected if m["channel"] == "final")
  assert reply.choices[0].message.content == final
  assert reply.choices[0].finish_reason in ("length", "stop")


def test_openai_client_stream_equals_non_stream(client):
  kwargs = dict(model="tiny", messages=HI, max_tokens=16, seed=11, temperature=1.0)
  whole = client.chat.completions.create(**kwargs)
  chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                               stream_options={"include_usage": True}))
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  assert text == whole.choices[0].message.content
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
  assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_endpoint(client):
  reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8,
                                    temperature=0)
  assert reply.usage.completion_tokens <= 8 and isinstance(reply.choices[0].text, str)
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
  assert streamed == reply.choices[0].text


def _run_together(engine, prompts, seeds, max_tokens=20):
  results = [[] for _ in prompts]
  done = [threading.Event() for _ in prompts]
  with engine._lock:  # (re-entrant) the engine admits them together: one batched prefill
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
      engine.submit(Request(prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=seed,
                            on_tokens=results[i].extend, on_done=lambda _, e=done[i]: e.set()))
  for event in done:
    assert event.wait(120)
  return results


def test_prefill_batches_pad_to_few_sizes():
  # Joiners share one prefill whose batch is padded, so a server compiles few shapes.
  assert [prefill.batch_bucket(rows, 16) for rows in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]
  assert prefill.batch_buckets(16) == [1, 2, 4, 8, 16] and prefill.batch_buckets(6) == [1, 2, 4, 6]


def test_seeded_tokens_do_not_depend_on_batch_mates():
  # A 512-token vocabulary: with 201k near-uniform tokens, ulp-level logit differences between
  # batch shapes move the draw to a neighbouring id too often (a floating-point tie).
  model = tiny_model(512)
  engine = Engine(model, slots=4, cache_length=128)
  try:
    engine.warm_up(30)  # prompt bucket 32: batch buckets 1, 2 and 4, and the decode chunk
    compiled = prefill._prefill_jit._cache_size()
    mine = [5, 6, 7, 8, 9]
    # Four rows in one prefill, all padded to the longest prompt's bucket (32, longer than the
    # sliding window's ring), then three rows padded to a batch of 4 ...
    first = _run_together(engine, [mine, [1, 2], [3] * 30, [400]], [42, 1, 2, 3])
    second = _run_together(engine, [[7] * 20, mine, [11, 12]], [9, 42, 8])
    assert prefill._prefill_jit._cache_size() == compiled  # ... and serving compiled nothing
  finally:
    engine.close()
  assert first[0] == second[1]  # other mates, another slot, same tokens
  # and the same as the one-request sampler's draw for that seed
  assert first[0] == generate(model, [mine], 20, temperature=1.0, top_p=1.0, seed=42,
                              stop_tokens=[])[0]


def test_a_request_joins_a_running_batch(harmony_server, full_tokenizer):
  _, engine, _ = harmony_server
  prompt = full_tokenizer.encode("hello")
  long_done, short_done = threading.Event(), threading.Event()
  long = Request(prompt=prompt, max_tokens=400, on_tokens=lambda t: None,
                 on_done=lambda _: long_done.set())
  engine.submit(long)
  assert long.started.wait(60)
  short = Request(prompt=prompt, max_tokens=4, on_tokens=lambda t: None,
                  on_done=lambda _: short_done.set())
  engine.submit(short)
  assert short_done.wait(60)
  assert not long_done.is_set(), "the short request waited for the long one"
  long.cancel()
  assert long_done.wait(60)


def test_disconnect_frees_the_slot(harmony_server):
  url, engine, _ = harmony_server
  response = requests.post(url + "/v1/chat/completions", stream=True, timeout=60, json={
      "messages": HI, "max_tokens": 380, "stream": True})
  assert response.status_code == 200, response.text
  deadline = time.time() + 30
  while not engine.busy_slots() and time.time() < deadline:
    time.sleep(0.02)
  assert engine.busy_slots() == 1  # decoding, and far from its 380 tokens
  response.close()  # hang up mid-stream
  deadline = time.time() + 30
  while engine.busy_slots() and time.time() < deadline:
    time.sleep(0.05)
  assert engine.busy_slots() == 0


@pytest.mark.parametrize("body, status, param", [
    ({"messages": HI, "model": "gpt-5"}, 404, "model"),
    ({"messages": HI, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": HI, "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "max_tokens"),
    ({"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"messages": []}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(harmony_server, body, status, param):
  url = harmony_server[0]
  response = requests.post(url + "/v1/chat/completions", json=body, timeout=60)
  assert response.status_code == status, response.text
  assert response.json()["error"]["param"] == param and response.json()["error"]["message"]
  assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_malformed_json_and_responses_endpoint(harmony_server):
  url = harmony_server[0]
  bad = requests.post(url + "/v1/chat/completions", data="{not json", timeout=10)
  assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
  assert requests.post(url + "/v1/responses", json={}, timeout=10).status_code == 400


def test_models_and_metrics(harmony_server):
  url = harmony_server[0]
  models = requests.get(url + "/v1/models", timeout=10).json()
  assert models["data"][0]["id"] == "tiny" and models["data"][0]["chat_format"] == "harmony"
  text = requests.get(url + "/metrics", timeout=10).text
  values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line and not line.startswith("#")}
  assert values["nanogptoss_requests_total"] >= 1
  assert values["nanogptoss_generated_tokens_total"] >= 1


def test_api_key_and_full_queue(full_tokenizer):
  model = tiny_model(full_tokenizer.vocab_size)
  with serve(model, full_tokenizer, api_key="sekrit", slots=1, max_queue=1) as (url, engine):
    assert requests.get(url + "/v1/models", timeout=10).status_code == 401
    ok = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0)
    assert ok.models.list().data[0].id == "tiny"
    hog = Request(prompt=[1, 2], max_tokens=500, on_tokens=lambda t: None, on_done=lambda _: 0)
    engine.submit(hog)
    assert hog.started.wait(60)
    engine.submit(Request(prompt=[1, 2], max_tokens=4, on_tokens=lambda t: None,
                          on_done=lambda _: 0))  # fills the one-place queue
    with pytest.raises(openai.RateLimitError):
      ok.chat.completions.create(model="tiny", messages=HI, max_tokens=4)
    hog.cancel()


def test_plain_text_mode_for_a_compact_vocabulary():
  tokenizer = CompactTokenizer(np.concatenate([byte_base_ids(), [199999, 200002]]))
  model = tiny_model(tokenizer.vocab_size)
  with serve(model, tokenizer, plain_text=True, slots=2) as (url, _):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    assert client.models.list().data[0].chat_format == "plain"
    reply = client.chat.completions.create(model="tiny", messages=HI, max_tokens=10,
                                           temperature=0)
    ids = generate(model, [tokenizer.encode("Hello there")], 10, temperature=0,
                   stop_tokens=list(tokenizer.stop_ids))[0]
    assert reply.choices[0].message.content == tokenizer.decode(ids).rstrip("\ufffd")


def test_a_stop_string_split_over_chunks_never_streams_its_start():
  """OpenAI's `stop` is left out of the text; streamed in pieces, none of it may go out."""
  import types

  from nanogptoss_jax.serving.app import TextStream
  letters = types.SimpleNamespace(decode=lambda ids: "".join(map(chr, ids)))
  service = types.SimpleNamespace(plain_text=True, tokenizer=letters)

  def feed(stream, text):
    return stream.feed([ord(c) for c in text])[1:]

  stream = TextStream(service, chat=False, stop=["The end"])
  assert feed(stream, "Once. Th") == ("Once. ", False)  # "Th" may begin the stop string
  assert feed(stream, "e e") == ("", False)
  assert feed(stream, "nd. More") == ("", True)
  assert stream.content == "Once. "
  stream = TextStream(service, chat=False, stop=["The end"])
  assert feed(stream, "Once. Th") == ("Once. ", False)
  assert feed(stream, "ere") == ("There", False)  # not the stop string after all
  assert feed(stream, " T") == (" ", False)
  assert stream.finish() == "T" and stream.content == "Once. There T"
