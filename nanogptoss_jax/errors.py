"""The one base class of the errors a user can fix: entry points print their message, no traceback."""


class UserError(Exception):
  """Bad input, a missing or unreadable file, an unreachable hub, a diverged run.

  The message says what is wrong and what to do. `nanogptoss_jax.cli` prints it as one line
  (exit code 1, or 2 for `UsageError`); library callers catch the typed subclasses.
  """


class UsageError(UserError, ValueError):
  """A command line that names an unknown flag or gives a flag a bad value."""
