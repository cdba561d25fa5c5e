"""SIGTERM / SIGINT as a flag the training loop checks between steps, so it can save and exit."""

import signal


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag so the loop can save and exit between steps.

  With several processes SIGTERM is left to JAX's preemption service (see `Trainer.run`): a
  process that stopped on its own would leave the others waiting in the next step's collectives.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self.requested = False
    self._signals = signals
    self._previous = {}

  def __enter__(self):
    for sig in self._signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C means "now"
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
