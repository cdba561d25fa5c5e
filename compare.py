"""Compare GPT-OSS with its GPT-2 twin over several seeds and write a report.

    python compare.py --config configs/compare_nano.py [--config.KEY=VALUE] [--run.KEY=VALUE]

`--config.KEY` sets a CompareConfig field (seeds=0,1,2, out_dir=..., sample_tokens=...);
`--run.KEY` overrides both run configs (e.g. --run.data.path=/path/to/tinystories). Rerunning
the same command skips the runs already trained and measured, and resumes an interrupted one.
"""

import logging
import sys

from nanogptoss_jax.compare import REPORT_FILE, compare, headline, parse_args


def main(argv: list[str]) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  cmp, run_overrides = parse_args(argv)
  summary = compare(cmp, run_overrides)
  print(headline(summary))
  print(f"report: {cmp.out_dir}/{REPORT_FILE}")


if __name__ == "__main__":
  main(sys.argv[1:])
