"""Score a checkpoint: lm-evaluation-harness tasks (--tasks), or loss and bits per byte on a text
dataset's windows, as training's validation computes them (--data).

examples:
  nanogptoss-eval --checkpoint runs/nano --tasks hellaswag --limit 100 --output-path evals
  nanogptoss-eval --checkpoint openai/gpt-oss-20b --tasks my_task --include-path my_tasks
  nanogptoss-eval --checkpoint runs/nano --data ../shared/data/tinystories/hf
"""

import argparse
import json
import logging
import os

from nanogptoss_jax import cli
from nanogptoss_jax.commands.generate import RUN_OR_PRETRAINED, _number, checkpoint_parser
from nanogptoss_jax.errors import UsageError, UserError

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"  # the version the tests run; pyproject's test extras
TEXT_RESULT_FILE = "loss.json"  # what --data writes into an --output-path directory


def parser() -> argparse.ArgumentParser:
  parse = checkpoint_parser("nanogptoss-eval", __doc__, RUN_OR_PRETRAINED)
  harness = parse.add_argument_group("lm-evaluation-harness tasks (the harness's own flags)")
  harness.add_argument("--tasks", nargs="+", help="task names, space- or comma-separated")
  harness.add_argument("--include-path", help="a directory of your own task YAML files")
  harness.add_argument("--limit", type=_number(float, 0, low_open=True),
                       help="examples per task (a fraction of them if below 1)")
  harness.add_argument("--num-fewshot", type=_number(int, 0))
  harness.add_argument("--output-path",
                       help="where the JSON result goes: a directory, or a file name ending .json")
  harness.add_argument("--log-samples", action="store_true",
                       help="also write every example's prompt and answer (with --output-path)")
  harness.add_argument("--seed", type=int, default=0)
  harness.add_argument("--max-length", type=_number(int, 2), default=None,
                       help="longest row scored (default: the model's, at most 8192)")
  harness.add_argument("--max-gen-toks", type=_number(int, 1), default=256,
                       help="new tokens per answer unless the task says")
  harness.add_argument("--batch-tokens", type=_number(int, 1), default=16384,
                       help="padded tokens per scoring batch")
  harness.add_argument("--generation-batch", type=_number(int, 1), default=16,
                       help="prompts sampled together")
  text = parse.add_argument_group("loss and bits per byte on a text dataset (without --tasks)")
  text.add_argument("--data", help="a hub dataset id, a local dataset directory or .txt files, "
                    "as train.py's --config.data.path")
  text.add_argument("--split", default="validation")
  text.add_argument("--context-len", type=_number(int, 1), default=256)
  text.add_argument("--windows", type=_number(int, 1), default=64,
                    help="fixed windows spread evenly over the split")
  text.add_argument("--batch-size", type=_number(int, 1), default=16)
  text.add_argument("--max-stories", type=_number(int, 0), default=0,
                    help="stories read from the split (0: all), as a run's data.max_stories")
  text.add_argument("--cache-dir", default=".cache/nanogptoss", help="tokenised data cache")
  return parse


def _eval(argv: list[str]) -> None:
  args = parser().parse_args(argv)
  if not args.tasks and not args.data:
    raise UsageError("pass --tasks (lm-evaluation-harness tasks) or --data (a text dataset "
                     "to score loss and bits per byte on); see nanogptoss-eval --help")
  if args.tasks and args.data:
    raise UsageError("--tasks and --data are separate evaluations; pass one of them")
  cli.setup_logging(absl_level=logging.ERROR)  # orbax's notes on read-only directories
  if args.tasks:
    _harness(args)
  else:
    _text(args)


def _harness(args) -> None:
  try:
    from nanogptoss_jax.evaluation.harness import HarnessModel
    from nanogptoss_jax.evaluation.tasks import run_tasks, task_manager
  except ImportError as missing:
    raise UserError(f"--tasks needs lm-evaluation-harness ({missing}): pip install "
                    f"'{LM_EVAL_REQUIREMENT}'") from None
  logging.getLogger("lm_eval").setLevel(logging.WARNING)  # one line per request batch at INFO
  tasks = [task for word in args.tasks for task in word.split(",") if task]
  limit = int(args.limit) if args.limit and args.limit >= 1 else args.limit
  manager = task_manager(tasks, args.include_path)  # a misspelt task fails before any loading
  lm = HarnessModel(args.checkpoint, max_length=args.max_length, max_gen_toks=args.max_gen_toks,
                    batch_tokens=args.batch_tokens, generation_batch=args.generation_batch,
                    seed=args.seed)
  _, table, written = run_tasks(lm, tasks, manager, limit=limit, num_fewshot=args.num_fewshot,
                                output_path=args.output_path, log_samples=args.log_samples,
                                seed=args.seed)
  print(table)
  if written:
    print(f"wrote {written}")


def _text(args) -> None:
  from nanogptoss_jax.data.config import DataConfig
  from nanogptoss_jax.evaluation.loading import load_model
  from nanogptoss_jax.evaluation.text import score_text, text_windows

  model, tokenizer = load_model(args.checkpoint)
  data = DataConfig(path=args.data, cache_dir=args.cache_dir, max_stories=args.max_stories)
  try:
    windows, weights, bytes_per_token = text_windows(tokenizer, data, args.split,
                                                     args.context_len, args.windows)
  except ValueError as error:  # fewer tokens than one window
    raise UserError(f"{args.data} ({args.split}): {error}") from None
  result = score_text(model, windows, weights, bytes_per_token, batch_size=args.batch_size)
  result |= {"checkpoint": args.checkpoint, "data": args.data, "split": args.split,
             "context_len": args.context_len}
  text = json.dumps(result, indent=2)
  print(text)
  if args.output_path:
    path = (args.output_path if args.output_path.endswith(".json")
            else os.path.join(args.output_path, TEXT_RESULT_FILE))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      f.write(text + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
  cli.run(_eval, argv)


if __name__ == "__main__":
  main()
