"""Runs lm-evaluation-harness tasks on a HarnessModel: its results dict, table and JSON files."""

import glob
import os

from nanogptoss_jax.errors import UserError


class TaskError(UserError):
  """A task name the harness does not know, or a task it could not run."""


def task_manager(tasks: list[str], include_path: str | None = None):
  """lm-eval's TaskManager over its own tasks and those in `include_path` (a directory of task
  YAML files), after checking it knows every name in `tasks`."""
  from lm_eval.tasks import TaskManager

  if include_path is not None and not os.path.isdir(include_path):
    raise TaskError(f"--include-path {include_path} is not a directory of task YAML files")
  manager = TaskManager(include_path=include_path)
  unknown = [task for task in tasks if not manager.match_tasks([task])
             and not os.path.isfile(task)]
  if unknown:
    raise TaskError(f"lm-eval knows no task {', '.join(unknown)}; list them with `lm-eval ls "
                    "tasks`, or pass --include-path with the directory of your task's YAML")
  return manager


def run_tasks(lm, tasks: list[str], manager, *, limit: float | None = None,
              num_fewshot: int | None = None, output_path: str | None = None,
              log_samples: bool = False, seed: int = 0) -> tuple[dict, str, str | None]:
  """(the harness's results, its results table, the JSON file written under output_path).

  `manager`: from task_manager; `limit`: examples per task (a fraction below 1); output_path
  as lm-eval's --output_path (a directory, or a .json file name that gets a date suffix).
  """
  from lm_eval import simple_evaluate
  from lm_eval.loggers import EvaluationTracker
  from lm_eval.utils import make_table

  tracker = EvaluationTracker(output_path=output_path) if output_path else None
  results = simple_evaluate(
      model=lm, model_args={"pretrained": lm.name}, tasks=tasks, num_fewshot=num_fewshot,
      limit=limit, task_manager=manager, evaluation_tracker=tracker, log_samples=log_samples,
      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
      fewshot_random_seed=seed)
  samples = results.pop("samples", None)
  written = None
  if tracker is not None:
    before = set(_result_files(output_path))
    tracker.save_results_aggregated(results=results, samples=samples if log_samples else None)
    if log_samples:
      for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    new = sorted(set(_result_files(output_path)) - before, key=os.path.getmtime)
    if not new:  # the harness logs a failed write and carries on; we say so
      raise TaskError(f"could not write the results under {output_path}")
    written = new[-1]
  table = make_table(results)
  if results.get("groups"):
    table += "\n" + make_table(results, "groups")
  return results, table, written


def _result_files(output_path: str) -> list[str]:
  """The aggregated-results files lm-eval writes for output_path (see its EvaluationTracker)."""
  if output_path.endswith(".json"):
    stem = output_path[:-len(".json")]
    return glob.glob(glob.escape(stem) + "_*.json")
  return glob.glob(os.path.join(glob.escape(output_path), "*", "results_*.json"))
