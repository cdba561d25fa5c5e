"""What every entry point shares: the CPU allocator settings, logging, and user errors printed
as one message with no traceback (exit code 2 for bad usage, 1 for a failure)."""

import logging
import os
import sys
import threading
from collections.abc import Callable

from nanogptoss_jax import cpu_malloc
from nanogptoss_jax.errors import UsageError, UserError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NANOGPTOSS_DEBUG"  # any non-empty value: tracebacks for user errors too
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


_debug = False  # set by `run`: tracebacks wanted

# Third-party INFO lines every command would print, shown with --debug: datasets' "JAX version
# ... available" (at import) and JAX's "Unable to initialize backend 'tpu'" (on every machine
# without one).
CHATTY_LOGGERS = ("datasets", "jax._src.xla_bridge")
# Orbax's warnings (through absl) that a read-only checkpoint manager will neither create nor
# save, which is what loading asks for; shown with --debug.
ORBAX_READ_ONLY_NOTES = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")


class _NoTracebacks(logging.Filter):
  """Keeps a log record's message and drops its traceback (a library's background thread logs
  its exception before the error reaches us, and we print that error as one line)."""

  def filter(self, record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    return True


class _DropOrbaxReadOnlyNotes(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(ORBAX_READ_ONLY_NOTES)


_orbax_filter = _DropOrbaxReadOnlyNotes()  # one instance: setup_logging may run twice


def setup_logging(absl_level: int = logging.WARNING) -> None:
  """INFO for our lines; absl (Orbax) at `absl_level`, third-party chatter hidden unless --debug."""
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  # absl (pulled in by orbax) logs every checkpoint file operation at INFO; keep ours readable.
  absl = logging.getLogger("absl")
  absl.setLevel(min(absl_level, logging.WARNING) if _debug else absl_level)
  if not _debug:
    absl.addFilter(_orbax_filter)
    for name in CHATTY_LOGGERS:
      logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
      handler.addFilter(_NoTracebacks())
    # After a failed checkpoint write Orbax leaves futures whose errors asyncio reports again at
    # exit, one per array; the error itself was already printed.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    # Their worker threads' own tracebacks, likewise: the failure reaches us as an error.
    threading.excepthook = lambda hook: logging.debug("thread %s failed: %s", hook.thread,
                                                      hook.exc_value)
    # And TensorStore's C++ callbacks: after a failed write they try to wake asyncio loops
    # that Orbax already closed, and print that error through sys.excepthook (PyErr_Print).
    sys.excepthook = _quiet_closed_loop_errors
    sys.unraisablehook = lambda hook: _quiet_closed_loop_errors(
        hook.exc_type, hook.exc_value, hook.exc_traceback, unraisable=hook)


def _quiet_closed_loop_errors(kind, error, traceback, unraisable=None) -> None:
  if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
    logging.debug("a background callback found its event loop closed")
  elif unraisable is not None:
    sys.__unraisablehook__(unraisable)
  else:
    sys.__excepthook__(kind, error, traceback)


def wants_help(argv: list[str]) -> bool:
  return any(arg in ("-h", "--help") for arg in argv)


def run(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
  """Runs `main(argv)` as a command (argv None: this process's command line, which first
  restarts the process with the allocator settings; see cpu_malloc)."""
  global _debug
  whole_process = argv is None
  if whole_process:
    cpu_malloc.reexec_with_malloc_tunables()
    argv = sys.argv[1:]
  debug = _debug = DEBUG_FLAG in argv or bool(os.environ.get(DEBUG_ENV))
  argv = [arg for arg in argv if arg != DEBUG_FLAG]
  try:
    main(argv)
  except (UserError, KeyboardInterrupt) as error:
    if debug:
      raise
    interrupted = isinstance(error, KeyboardInterrupt)
    print("interrupted" if interrupted else f"error: {error}", file=sys.stderr)
    code = (EXIT_INTERRUPTED if interrupted else
            EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE)
    if whole_process:
      # Straight out: at interpreter exit, the worker threads of a failed checkpoint write
      # would print their own tracebacks after the one line that says what to do.
      logging.shutdown()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    raise SystemExit(code) from None
