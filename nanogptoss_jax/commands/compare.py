"""Compare GPT-OSS with its GPT-2 twin over several seeds and write a report.

    nanogptoss-compare --config configs/compare_nano.py [--config.KEY=VALUE] [--run.KEY=VALUE]

`--config.KEY` sets a CompareConfig field (seeds=0,1,2, out_dir=..., sample_tokens=...);
`--run.KEY` overrides both run configs (e.g. --run.data.path=/path/to/tinystories). Rerunning
the same command skips the runs already trained and measured, and resumes an interrupted one.
"""

from nanogptoss_jax import cli


def _compare(argv: list[str]) -> None:
  if cli.wants_help(argv):
    print(__doc__.strip())
    return
  cli.setup_logging()
  # Imported here, after `cli.run` set the process up (JAX is heavy to import).
  from nanogptoss_jax.experiments.compare_config import parse_args
  from nanogptoss_jax.experiments.compare_report import REPORT_FILE, headline
  from nanogptoss_jax.experiments.compare_runs import compare
  cmp, run_overrides = parse_args(argv)
  summary = compare(cmp, run_overrides)
  print(headline(summary))
  print(f"report: {cmp.out_dir}/{REPORT_FILE}")


def main(argv: list[str] | None = None) -> None:
  cli.run(_compare, argv)


if __name__ == "__main__":
  main()
