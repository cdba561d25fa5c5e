"""lm-evaluation-harness over our models: its loglikelihoods equal our own token losses, its
generations are our greedy sampler's cut at the stop strings, a local multiple-choice and a local
generation task score what those say, and `nanogptoss-eval --data` equals training's validation."""

import json
from functools import partial
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from nanogptoss_jax.commands import eval as eval_command  # noqa: E402
from nanogptoss_jax.data.bpe import base_encoding  # noqa: E402
from nanogptoss_jax.data.tokenizer import build_compact_tokenizer, count_base_ids  # noqa: E402
from nanogptoss_jax.evaluation.generation import cut_at_stop  # noqa: E402
from nanogptoss_jax.evaluation.harness import HarnessModel  # noqa: E402
from nanogptoss_jax.model.config import GptOssConfig  # noqa: E402
from nanogptoss_jax.model.gptoss import GptOss  # noqa: E402
from nanogptoss_jax.pretrained.export import save_pretrained  # noqa: E402
from nanogptoss_jax.sampling.decode import generate  # noqa: E402
from tests.train_helpers import HF_MIRROR, tiny_run  # noqa: E402

VOCAB = 512
MAX_LENGTH = 32  # short, so truncation and rolling windows happen on short texts
ORACLE_LENGTH = 64  # the oracle's rows are padded to this
TOLERANCE = 1e-5
CFG = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, vocab_size=VOCAB,
                   hidden_size=64, intermediate_size=64, head_dim=16, num_attention_heads=4,
                   num_key_value_heads=2, sliding_window=8, initial_context_length=256,
                   rope_scaling_factor=1.0)
STORY = ("Once upon a time, there was a little girl named Lily. She liked to play in the park "
         "with her dog. One day, the sun was hot and the dog was tired, so they sat under a "
         "big tree and ate an apple.")


@pytest.fixture(scope="module")
def tokenizer():
  """A compact vocabulary of 512 ids fitted to TinyStories text (words, not only bytes)."""
  text = (HF_MIRROR.parent / "TinyStories-valid.txt").read_text()[:200_000]
  base = np.asarray(base_encoding().encode_ordinary(text), np.int64)
  return build_compact_tokenizer(count_base_ids(base), VOCAB)


@pytest.fixture(scope="module")
def model():
  return GptOss(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def lm(model, tokenizer):
  return HarnessModel(model=model, tokenizer=tokenizer, max_length=MAX_LENGTH, batch_tokens=128)


@partial(jax.jit, static_argnums=0)
def _losses_and_argmax(graphdef, params, tokens, targets):
  model = nnx.merge(graphdef, params)
  out = model.forward(tokens)
  return model.unembedding.cross_entropy(out.hidden, targets), out.logits.argmax(-1)


def _our_losses(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
  """(next-token losses as training computes them (unembedding.cross_entropy), the argmax
  tokens), each [len(ids) - 1]. Right-padded to one length, so one shape compiles."""
  tokens, targets = np.zeros((2, 1, ORACLE_LENGTH), np.int32)
  tokens[0, :len(ids) - 1], targets[0, :len(ids) - 1] = ids[:-1], ids[1:]
  losses, argmax = _losses_and_argmax(*nnx.split(model), tokens, targets)
  return np.asarray(losses)[0, :len(ids) - 1], np.asarray(argmax)[0, :len(ids) - 1]


def _our_loglikelihood(model, context: list[int], continuation: list[int]):
  """(log p(continuation | context), whether each of its tokens is the argmax)."""
  whole = (context + continuation)[-(MAX_LENGTH + 1):]
  scored = slice(len(whole) - 1 - len(continuation), len(whole) - 1)
  losses, argmax = _our_losses(model, whole)
  greedy = bool(np.all(argmax[scored] == np.asarray(whole[1:])[scored]))
  return -float(losses[scored].sum()), greedy


def _requests(kind: str, arguments: list[tuple]) -> list[Instance]:
  return [Instance(kind, {}, args, index) for index, args in enumerate(arguments)]


def test_loglikelihoods_equal_our_token_losses(lm, model, tokenizer):
  pairs = [("Once upon a time", " there was a girl"), ("", "Lily"), ("The dog ", "ran."),
           (STORY, " The end."),  # longer than MAX_LENGTH: left-truncated
           ("She", " liked to play in the park with her dog every day.")]
  got = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
  for (context, continuation), (logprob, greedy) in zip(pairs, got):
    if context:  # a context's trailing spaces belong to the continuation (lm-eval's rule)
      whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(
          context.rstrip())
      ids = (context_ids, whole[len(context_ids):])
    else:  # an empty context conditions on EOT
      ids = ([tokenizer.eot_id], tokenizer.encode(continuation))
    want, want_greedy = _our_loglikelihood(model, *ids)
    assert logprob == pytest.approx(want, rel=TOLERANCE, abs=TOLERANCE), (context, continuation)
    assert greedy == want_greedy
  # A continuation of the model's own greedy tokens is greedy; change its last token and not.
  context = tokenizer.encode("Once upon a time")
  drawn = generate(model, [context], 4, temperature=0.0, stop_tokens=())[0]
  other = drawn[:-1] + [(drawn[-1] + 1) % VOCAB]
  flags = [greedy for _, greedy in lm._loglikelihood_tokens(
      [(("", ""), context, drawn), (("", ""), context, other)], disable_tqdm=True)]
  assert flags == [True, False]


def test_loglikelihood_rolling_sums_our_losses_over_its_windows(lm, model, tokenizer):
  texts = ["Lily and her dog.", STORY]  # one window; several windows of MAX_LENGTH
  got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts]),
                                 disable_tqdm=True)
  counts = []
  for text, total in zip(texts, got):
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokenizer.encode(text), tokenizer.eot_id, MAX_LENGTH, 1)]
    counts.append(len(windows))
    want = sum(-float(_our_losses(model, context + cont)[0][-len(cont):].sum())
               for context, cont in windows)
    assert total == pytest.approx(want, rel=TOLERANCE)
  assert counts[0] == 1 and counts[1] >= 3


def _greedy_text(model, tokenizer, prompt: str, max_new: int, stop: list[str]) -> str:
  """Our sampler's greedy continuation, decoded, cut at the first stop string."""
  drawn = generate(model, [tokenizer.encode(prompt)], max_new, temperature=0.0,
                   stop_tokens=tokenizer.stop_ids)[0]
  return cut_at_stop(tokenizer.decode(drawn), stop)


def test_generate_until_is_our_greedy_sampler_cut_at_the_stop_strings(lm, model, tokenizer):
  prompts = ["Once upon a time", "The dog", "Lily liked to"]
  free = [_greedy_text(model, tokenizer, p, 12, []) for p in prompts]
  # Stop strings the answers do contain, so the sampler is ended early.
  stops = [text[len(text) // 2:len(text) // 2 + 2] for text in free]
  arguments = [(p, {"until": [s], "max_gen_toks": 12}) for p, s in zip(prompts, stops)]
  arguments.append((prompts[0], {"until": [], "max_gen_toks": 5, "do_sample": False}))
  got = lm.generate_until(_requests("generate_until", arguments), disable_tqdm=True)
  for (prompt, kwargs), text in zip(arguments, got):
    want = _greedy_text(model, tokenizer, prompt, kwargs["max_gen_toks"], kwargs["until"])
    assert text == want, (prompt, kwargs)
  assert all(s and s not in text for s, text in zip(stops, got))


def _write_tasks(directory: Path, mc_docs: list[dict], gen_docs: list[dict]) -> None:
  """A multiple-choice and a generation task as YAML over local JSON files."""
  for name, docs in (("mc", mc_docs), ("gen", gen_docs)):
    (directory / f"{name}.json").write_text("\n".join(json.dumps(d) for d in docs))
  common = ("dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\n"
            "test_split: test\nmetadata:\n  version: 1.0\n")
  (directory / "tiny_mc.yaml").write_text(
      "task: tiny_mc\n" + common.format(file=directory / "mc.json") +
      "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
      "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n")
  (directory / "tiny_gen.yaml").write_text(
      "task: tiny_gen\n" + common.format(file=directory / "gen.json") +
      "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
      "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
      "metric_list:\n  - metric: exact_match\n")


def test_the_command_scores_local_tasks_as_our_model_does(model, tokenizer, lm, tmp_path,
                                                          capsys):
  # Each task's first document is answered as our model answers it, its second not: the
  # harness must score 0.5 on both, through the command, from a published checkpoint.
  questions = [("Lily had a", [" dog", " cat", " tree"]), ("The sun was", [" hot", " blue"])]
  mc_docs = []
  for doc, (question, choices) in enumerate(questions):
    context = tokenizer.encode(question)
    scores = [_our_loglikelihood(model, context, tokenizer.encode(question + c)[len(context):])[0]
              for c in choices]
    best = int(np.argmax(scores))
    mc_docs.append({"question": question, "choices": [c.strip() for c in choices],
                    "answer": best if doc == 0 else (best + 1) % len(choices)})
  answers = [_greedy_text(model, tokenizer, p, 8, ["."]) for p in ("Once upon", "One day")]
  gen_docs = [{"prompt": "Once upon", "target": answers[0]},
              {"prompt": "One day", "target": answers[1] + " not this"}]
  _write_tasks(tmp_path, mc_docs, gen_docs)
  published = tmp_path / "published"
  save_pretrained(model, tokenizer, str(published), dtype="float32")
  eval_command.main(["--checkpoint", str(published), "--tasks", "tiny_mc,tiny_gen",
                     "--include-path", str(tmp_path), "--output-path", str(tmp_path / "out"),
                     "--max-length", str(MAX_LENGTH)])
  out = capsys.readouterr().out
  assert "tiny_mc" in out and "tiny_gen" in out and "exact_match" in out, out
  written = Path(out.strip().splitlines()[-1].removeprefix("wrote "))
  results = json.loads(written.read_text())["results"]
  assert results["tiny_mc"]["acc,none"] == 0.5
  assert results["tiny_gen"]["exact_match,none"] == 0.5


def test_an_unknown_task_is_one_line(tmp_path, capsys):
  published = tmp_path / "missing"
  with pytest.raises(SystemExit) as exit_info:
    eval_command.main(["--checkpoint", str(published), "--tasks", "no_such_task_anywhere",
                       "--include-path", str(tmp_path)])
  assert exit_info.value.code == 1
  assert "lm-eval knows no task no_such_task_anywhere" in capsys.readouterr().err


def test_data_scores_a_run_directory_as_training_validation_did(tmp_path, capsys):
  from nanogptoss_jax.training.loop import Trainer
  cfg = tiny_run(tmp_path / "run", tmp_path / "cache", steps=2, eval_every=2, ckpt_every=2)
  Trainer(cfg, progress=False).run()
  capsys.readouterr()  # the trainer's own lines
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  validation = [row for row in logged if "val_loss" in row][-1]
  eval_command.main(["--checkpoint", str(tmp_path / "run"), "--data", cfg.data.path,
                     "--context-len", str(cfg.train.context_len),
                     "--windows", str(cfg.data.val_windows),
                     "--batch-size", "6",  # 16 windows: the last batch is padded
                     "--max-stories", str(cfg.data.max_stories),
                     "--cache-dir", cfg.data.cache_dir, "--output-path", str(tmp_path / "out")])
  printed = capsys.readouterr().out
  result = json.loads((tmp_path / "out" / eval_command.TEXT_RESULT_FILE).read_text())
  assert json.loads(printed[:printed.rindex("}") + 1]) == result
  assert result["loss"] == pytest.approx(validation["val_loss"], rel=TOLERANCE)
  assert result["bits_per_byte"] == pytest.approx(validation["val_bpb"], rel=TOLERANCE)
