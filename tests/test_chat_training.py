"""Fine-tuning on harmony conversations with the same trainer: the run resumes loss for loss
after a SIGKILL (Trainer.run(until=k) stops through the same checkpoints), its evaluation is the assistant-token loss of each held-out
conversation alone, and a fine-tune from a text run reads the chats in that run's vocabulary."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.chat.examples import prepare_chat_examples
from nanogptoss_jax.data.config import ChatDataError
from nanogptoss_jax.training import weights
from nanogptoss_jax.training.config_files import apply_overrides
from nanogptoss_jax.training.config_io import config_from_dict, config_to_dict
from nanogptoss_jax.training.faults import FAULT_ENV
from nanogptoss_jax.training.losses import token_losses
from nanogptoss_jax.training.loop import Trainer, train
from tests.train_helpers import tiny_chat_run, tiny_run, write_sum_chats

REPO = Path(__file__).resolve().parents[1]
CONFIG_TEXT = """from train_helpers import tiny_chat_run

def get_config():
  return tiny_chat_run({run_dir!r}, {cache_dir!r}, {chats!r})
"""


def _rows(run_dir) -> tuple[dict, dict]:
  """(step -> train row, step -> eval row), timings left out; a step logged twice fails."""
  steps, evals = {}, {}
  for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    target = evals if "val_loss" in row else steps
    assert row["step"] not in target, f"step {row['step']} logged twice"
    target[row["step"]] = {k: v for k, v in row.items() if k != "tokens_per_s"}
  return steps, evals


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  return tmp_path_factory.mktemp("chat-training")


@pytest.fixture(scope="module")
def chats(root):
  return write_sum_chats(root / "chats")


@pytest.fixture(scope="module")
def baseline(root, chats):
  """One uninterrupted chat run of 8 steps (evals at 4 and 8, checkpoints every 3)."""
  cfg = tiny_chat_run(root / "baseline", root / "cache", chats)
  train(cfg, progress=False)
  return cfg, _rows(cfg.run_dir)


def test_a_chat_run_learns_and_logs_its_held_out_assistant_loss(baseline):
  _, (steps, evals) = baseline
  assert sorted(evals) == [4, 8] and all("val_bpb" not in row for row in evals.values())
  assert evals[8]["val_loss"] < evals[4]["val_loss"] < steps[1]["loss"]
  # The sample answers the prompt as a user's message: harmony tokens, not story text.
  assert all(isinstance(row["sample"], str) for row in evals.values())


def test_sigkill_mid_step_then_rerun_equals_the_uninterrupted_chat_run(baseline, root, chats):
  run_dir = root / "killed"
  config = root / "config_killed.py"
  config.write_text(CONFIG_TEXT.format(run_dir=str(run_dir), cache_dir=str(root / "cache"),
                                       chats=chats))
  env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
         "JAX_COMPILATION_CACHE_DIR": str(root / "jax-cache"),  # the rerun compiles nothing
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  command = [sys.executable, "train.py", "--config", str(config)]
  killed = subprocess.run(command, cwd=REPO, env=env | {FAULT_ENV: "mid_step:5"},
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert "resumed from step 3" in rerun.stderr
  assert _rows(run_dir) == baseline[1]


def test_eval_is_the_assistant_token_loss_of_each_held_out_conversation_alone(baseline):
  cfg, (_, evals) = baseline
  trainer = Trainer(cfg, progress=False)  # the finished run, at step 8
  model, tokenizer = trainer.model(), trainer.tokenizer
  trainer.close()
  _, held_out = prepare_chat_examples(cfg.data.chat, tokenizer, cfg.train.context_len)
  assert len(held_out) == cfg.data.chat.val_conversations
  total, count = 0.0, 0
  for example in held_out:
    # Alone in its row, no positions, no weights, the trained targets picked by index; ids
    # after its end (one shape, one compile) cannot reach its tokens through causal attention.
    ids = np.zeros((1, cfg.train.context_len + 1), np.int32)
    ids[0, :len(example.ids)] = example.ids
    losses, _ = token_losses(model, {"inputs": ids[:, :-1], "targets": ids[:, 1:]})
    trained = np.asarray(losses, np.float64)[0, example.trained_from - 1:len(example.ids) - 1]
    total, count = total + trained.sum(), count + trained.size
    # What is trained is what the model samples: the answer and its <|return|>.
    assert harmony.parse_chat(example.ids[example.trained_from:], tokenizer=tokenizer)[-1][
        "channel"] == "final"
  assert evals[8]["val_loss"] == pytest.approx(total / count, rel=1e-5)


def test_a_fine_tune_of_a_text_run_reads_the_chats_in_its_vocabulary(root, chats):
  """A compact text run keeps harmony's special tokens; a chat run from it reads the chats in
  its ids and starts at its weights (the first loss is the base model's on that batch)."""
  base = tiny_run(root / "text", root / "cache", steps=1, eval_every=1, ckpt_every=1,
                  sample_tokens=0)
  train(base, progress=False)
  base_model, base_tokenizer = weights.load_checkpoint(base.run_dir)
  assert harmony.supports_harmony(base_tokenizer)
  # Stories' vocabulary spells much of harmony's system message in bytes: a longer context.
  cfg = tiny_chat_run(root / "tuned", root / "cache", chats, init_from=base.run_dir,
                      context_len=320)
  trainer = Trainer(cfg, progress=False)
  assert trainer.tokenizer.to_dict() == base_tokenizer.to_dict()
  batch = trainer._next_batch()  # [accum, B, T] dicts
  first = {key: np.asarray(value[0]) for key, value in batch.items()}
  losses, _ = token_losses(base_model, first)
  want = float(losses.sum() / first["weights"].sum())
  trainer.state, metrics = trainer.train_step(trainer.state, batch)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  trainer.run(until=2)  # saves step 2
  trainer.close()
  # Every weight trained, so every weight is in its checkpoints: a later change to the base
  # (here its step's checksums rewritten) does not stop the fine-tuned run from loading.
  sealed = next(Path(base.run_dir, "best").glob("*/checksums.json"))
  sealed.write_text(json.dumps(json.loads(sealed.read_text()), indent=1))
  tuned, _ = weights.load_checkpoint(cfg.run_dir)
  assert tuned.cfg.vocab_size == base_model.cfg.vocab_size


def test_chat_settings_round_trip_and_bad_ones_are_one_line(chats, tmp_path):
  cfg = tiny_chat_run(tmp_path / "run", tmp_path / "cache", chats)
  saved = json.loads(json.dumps(config_to_dict(cfg)))
  assert config_from_dict(saved) == cfg
  changed = apply_overrides(cfg, ["data.chat.too_long=cut", "data.chat.val_split="])
  assert changed.data.chat == dataclasses.replace(cfg.data.chat, too_long="cut", val_split="")
  with pytest.raises(ChatDataError, match="too_long must be one of drop, cut, got 'trim'"):
    apply_overrides(cfg, ["data.chat.too_long=trim"])


class _RecordingEngine:
  """Takes requests and answers none: what the chat command and the server ask for."""

  cache_length = 4096

  def __init__(self):
    self.requests = []

  def check(self, prompt_length, max_tokens):
    pass

  def submit(self, request):
    self.requests.append(request)
    request.on_done("stop")


def test_a_chat_run_opens_in_harmony_and_stops_on_its_own_return_and_call_ids(baseline):
  import argparse
  import asyncio
  import io

  from nanogptoss_jax.commands.chat import Chat
  from nanogptoss_jax.serving.app import Service
  from nanogptoss_jax.serving.open_model import open_model
  cfg, _ = baseline
  model, tokenizer, plain = open_model(cfg.run_dir)
  assert not plain  # trained on chats: harmony, although its vocabulary is compact
  engine = _RecordingEngine()
  service = Service(engine, tokenizer, model_name="t", plain_text=False)
  args = argparse.Namespace(system=None, reasoning_effort="low", max_tokens=5, temperature=1.0,
                            top_p=1.0, seed=0, show_analysis=False)
  Chat(service, args, io.StringIO()).answer("What is 2 plus 3?")
  body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
  loop = asyncio.new_event_loop()
  try:
    [request] = service.requests(body, True, asyncio.Queue(), loop)
  finally:
    loop.close()
  for stops in (engine.requests[0].stop_ids, request.stop_ids):
    # The compact vocabulary's own ids of <|return|> and <|call|>, not o200k_harmony's.
    assert max(stops) < model.cfg.vocab_size
    assert tokenizer.to_base_ids(list(stops)).tolist() == list(harmony.STOP_IDS)


def test_the_fine_tuning_configs_load_and_validate():
  from nanogptoss_jax.model.config import GPT_OSS_20B
  from nanogptoss_jax.training.config_files import load_config_file
  from nanogptoss_jax.training.run_config import validate_run_config
  nano = load_config_file(REPO / "configs" / "nano.py")
  tuned = load_config_file(REPO / "configs" / "finetune_nano_chat.py")
  validate_run_config(tuned)
  assert tuned.model == nano.model and tuned.data.compact_vocab_size == nano.data.compact_vocab_size
  assert tuned.data.is_chat and tuned.data.chat.too_long == "drop"
  assert tuned.train.init_from == "runs/nano" and tuned.train.context_len == 512
  lora = load_config_file(REPO / "configs" / "finetune_nano_chat_lora.py")
  validate_run_config(lora)
  # The same run but for the adapters, what trains, their rate and the run directory.
  assert dataclasses.replace(lora, lora=None, optim=tuned.optim, run_dir=tuned.run_dir,
                             train=tuned.train) == tuned
  assert dataclasses.replace(lora.train, trainable="") == tuned.train
  assert lora.lora.rank == 8 and lora.optim.lr > tuned.optim.lr and lora.run_dir != tuned.run_dir
  # The adapters and both (un)embedding tables train, nothing else.
  from nanogptoss_jax.training.state import abstract_run_model, trainable_filter
  from flax import nnx
  trained = nnx.state(abstract_run_model(lora), trainable_filter(lora.train.trainable))
  paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trained)}
  assert {"embedding.embedding", "unembedding.kernel"} <= paths
  assert all("lora_" in p for p in paths - {"embedding.embedding", "unembedding.kernel"})
  qlora = load_config_file(REPO / "configs" / "finetune_20b_lora.py")
  validate_run_config(qlora)
  assert qlora.model == GPT_OSS_20B and qlora.execution.expert_format == "mxfp4"
  assert qlora.data.chat.path == "HuggingFaceH4/Multilingual-Thinking"
  assert (qlora.optim.lr, qlora.train.context_len, qlora.train.init_from) == (
      2e-4, 2048, "openai/gpt-oss-20b")
  assert 0 < qlora.optim.warmup_steps < qlora.train.steps and qlora.optim.min_lr < qlora.optim.lr
  assert (qlora.lora.rank, qlora.lora.alpha) == (8, 16)
