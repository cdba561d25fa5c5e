"""nanogptoss-chat as a user drives it: a subprocess fed on stdin over a tiny trained run."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.commands.chat import PROMPT, STOPPED
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.serving.open_model import open_model
from nanogptoss_jax.training.weights import load_checkpoint
from nanogptoss_jax.training.loop import train
from tests.train_helpers import tiny_run

REPO = Path(__file__).resolve().parents[1]
LINE = "Once upon a time"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("chat")
  train(tiny_run(root / "run", root / "cache", steps=4, eval_every=4, ckpt_every=4),
        progress=False)
  return root / "run"


@pytest.fixture(scope="module")
def loaded(run_dir):
  return load_checkpoint(run_dir)


class Chat:
  """The chat command in a subprocess; stdout gathered by a thread as it comes."""

  def __init__(self, *args):
    self.process = subprocess.Popen([sys.executable, str(REPO / "chat.py"), *args], cwd=REPO,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=dict(os.environ))
    self.out = b""
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    while chunk := os.read(self.process.stdout.fileno(), 4096):
      self.out += chunk

  def send(self, line: str) -> None:
    self.process.stdin.write(line.encode() + b"\n")
    self.process.stdin.flush()

  def wait_for(self, predicate, timeout=120) -> str:
    deadline = time.time() + timeout
    while not predicate(self.text()):
      assert time.time() < deadline and self.process.poll() is None, self.text()
      time.sleep(0.02)
    return self.text()

  def text(self) -> str:
    return self.out.decode("utf-8", errors="replace")

  def finish(self, timeout=60) -> tuple[int, str, str]:
    self.process.stdin.close()
    code = self.process.wait(timeout)
    self._reader.join(10)
    return code, self.text(), self.process.stderr.read().decode()


def _expected(loaded, seed, max_tokens):
  """The one-request sampler's answer (plain-text mode: the prompt is the last message)."""
  model, tokenizer = loaded
  ids = generate(model, [tokenizer.encode(LINE)], max_tokens, temperature=1.0, top_p=1.0,
                 seed=seed, stop_tokens=list(tokenizer.stop_ids))[0]
  return tokenizer.decode(ids).rstrip("\ufffd")


def test_answers_reset_and_quit(run_dir, loaded):
  chat = Chat("--checkpoint", str(run_dir), "--max-tokens", "12", "--temperature", "1.0",
              "--seed", "5")
  for line in (LINE, LINE, "/reset", LINE, "/quit"):
    chat.send(line)
  code, out, err = chat.finish()
  assert code == 0, err
  first, second = _expected(loaded, 5, 12), _expected(loaded, 6, 12)
  assert first != second  # turn n samples with seed + n, so /reset is visible
  answers = out.split(PROMPT)[1:]
  assert [a.rstrip("\n") for a in answers] == [first, second, "(new conversation)", first, ""]


def test_sigint_stops_the_answer_not_the_program(run_dir):
  # Greedy and long, so the answer is still streaming when the signal comes.
  chat = Chat("--checkpoint", str(run_dir), "--max-tokens", "4000", "--temperature", "0")
  chat.send(LINE)
  chat.wait_for(lambda text: len(text) > len(PROMPT) + 20)
  chat.process.send_signal(signal.SIGINT)
  chat.wait_for(lambda text: STOPPED in text)
  chat.send(LINE)  # alive, and answering the next line
  chat.wait_for(lambda text: len(text.split(STOPPED)[1]) > len(PROMPT) + 20)
  chat.process.send_signal(signal.SIGINT)
  chat.wait_for(lambda text: text.count(STOPPED) == 2)
  code, out, err = chat.finish()
  assert code == 0, err
  assert out.split(PROMPT)[1].startswith(out.split(PROMPT)[2][:20])  # greedy: the same start


def test_missing_checkpoint_is_one_error_line(tmp_path):
  result = subprocess.run([sys.executable, str(REPO / "chat.py"), "--checkpoint",
                           str(tmp_path / "nope")], cwd=REPO, capture_output=True, text=True,
                          timeout=120, input="")
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "nope" in errors[0], result.stderr
  assert "Traceback" not in result.stderr


def test_open_model_opens_a_run_directory(run_dir, loaded):
  model, tokenizer, plain = open_model(str(run_dir))
  theirs, their_tokenizer = loaded
  assert plain  # a run trained on text never learned harmony
  assert tokenizer.to_dict() == their_tokenizer.to_dict()
  assert model.cfg == theirs.cfg
  mine, want = (nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (model, theirs))
  assert len(mine) == len(want) > 0
  for (path, value), (their_path, their_value) in zip(mine, want):
    assert path == their_path
    np.testing.assert_array_equal(np.asarray(value[...]), np.asarray(their_value[...]))


class _ScriptedEngine:
  """Answers every request with the same harmony ids at once; remembers the prompts."""

  cache_length = 4096

  def __init__(self, ids):
    self.ids, self.prompts = ids, []

  def check(self, prompt_length, max_tokens):
    pass

  def submit(self, request):
    self.prompts.append(request.prompt)
    for token in self.ids:
      request.on_tokens([token])
    request.on_done("stop")


@pytest.mark.parametrize("show_analysis", [False, True])
def test_harmony_turns_stream_final_and_keep_the_conversation(show_analysis):
  import argparse
  import io

  from nanogptoss_jax.chat import harmony
  from nanogptoss_jax.commands.chat import Chat as ChatLoop
  from nanogptoss_jax.data.tokenizer import FullTokenizer
  from nanogptoss_jax.serving.app import Service
  tokenizer = FullTokenizer()
  completion = ("<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
                "<|message|>It is 4.<|return|>")
  ids = tokenizer.from_base_ids(tokenizer.encoding.encode(completion, allowed_special="all"))
  engine = _ScriptedEngine([int(i) for i in ids if int(i) != harmony.STOP_IDS[0]])
  args = argparse.Namespace(system="Be brief", reasoning_effort="low", max_tokens=50,
                            temperature=1.0, top_p=1.0, seed=0, show_analysis=show_analysis)
  out = io.StringIO()
  chat = ChatLoop(Service(engine, tokenizer, model_name="t", plain_text=False), args, out)
  chat.answer("2+2?")
  chat.answer("Sure?")
  text = out.getvalue()
  assert text.count("It is 4.") == 2 and ("Think." in text) == show_analysis
  # The second prompt holds the first turn, its answer on the final channel (the oracle-tested
  # renderer; the analysis of earlier turns dropped as harmony does).
  assert engine.prompts[1] == harmony.render_chat(
      [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "2+2?"},
       {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "Sure?"}],
      tokenizer=tokenizer, reasoning_effort="low")
