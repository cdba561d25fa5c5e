"""What every entry point shares: the CPU allocator settings, logging, and user errors printed
as one message with no traceback (exit code 2 for bad usage, 1 for a failure)."""

import logging
import os
import sys
from collections.abc import Callable

from nanogptoss_jax import cpu_malloc
from nanogptoss_jax.errors import UsageError, UserError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NANOGPTOSS_DEBUG"  # any non-empty value: tracebacks for user errors too
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def setup_logging(absl_level: int = logging.WARNING) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  # absl (pulled in by orbax) logs every checkpoint file operation at INFO; keep ours readable.
  logging.getLogger("absl").setLevel(absl_level)


def wants_help(argv: list[str]) -> bool:
  return any(arg in ("-h", "--help") for arg in argv)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """Runs `main(argv)` as a command (argv None: this process's command line, which first
  restarts the process with the allocator settings; see cpu_malloc)."""
  if argv is None:
    cpu_malloc.reexec_with_malloc_tunables()
    argv = sys.argv[1:]
  debug = DEBUG_FLAG in argv or bool(os.environ.get(DEBUG_ENV))
  argv = [arg for arg in argv if arg != DEBUG_FLAG]
  try:
    main(argv)
  except UserError as error:
    if debug:
      raise
    print(f"error: {error}", file=sys.stderr)
    hint = f"(run with {DEBUG_FLAG} for a traceback)"
    if isinstance(error, UsageError):
      print(hint, file=sys.stderr)
    raise SystemExit(EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE) from None
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted", file=sys.stderr)
    raise SystemExit(EXIT_INTERRUPTED) from None
