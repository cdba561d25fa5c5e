"""Progress bars: tqdm redrawing at its usual pace on a terminal, every few seconds in a log file
(`train.py > log 2>&1`), so a long run's log holds lines, not megabytes of redraws."""

import sys

from tqdm import tqdm

# Seconds between draws of a progress bar written to a file (a log), not to a terminal.
FILE_PROGRESS_INTERVAL_S = 5.0
TERMINAL_PROGRESS_INTERVAL_S = 0.1  # tqdm's default


def progress_interval() -> float:
  """tqdm's mininterval for a bar on stderr."""
  return TERMINAL_PROGRESS_INTERVAL_S if sys.stderr.isatty() else FILE_PROGRESS_INTERVAL_S


def progress_bar(*args, **kwargs) -> tqdm:
  """tqdm(*args, **kwargs), drawn every few seconds at most when stderr is not a terminal."""
  return tqdm(*args, mininterval=progress_interval(), **kwargs)
