"""Train a model: `python train.py --config configs/nano.py [--config.KEY=VALUE ...]`."""

if __name__ == "__main__":  # first, before the heavy imports: it may restart the process
  from nanogptoss_jax.cpu_malloc import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()

import logging
import sys

from nanogptoss_jax.checkpoint import CheckpointError
from nanogptoss_jax.config import ConfigError
from nanogptoss_jax.config_cli import ConfigFileError, ConfigOverrideError, parse_args
from nanogptoss_jax.data import DataUnavailableError
from nanogptoss_jax.tokenizer import TokenizerUnavailableError
from nanogptoss_jax.trainer import TrainingDivergedError, train

# Errors whose message already says what went wrong and what to do: shown without a traceback.
USER_ERRORS = (ConfigError, ConfigFileError, ConfigOverrideError, FileNotFoundError,
               DataUnavailableError, TokenizerUnavailableError, CheckpointError,
               TrainingDivergedError)


def main(argv: list[str]) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  # absl (pulled in by orbax) logs every checkpoint file operation at INFO; keep ours readable.
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    cfg, rest = parse_args(argv)
    if rest:
      raise ConfigOverrideError(f"unrecognised arguments: {rest}; use --config PATH and "
                                f"--config.KEY=VALUE")
    metrics = train(cfg)
  except USER_ERRORS as error:
    raise SystemExit(f"error: {error}") from None
  print({k: v for k, v in metrics.items() if k in ("step", "val_loss", "val_bpb", "train_loss")})


if __name__ == "__main__":
  main(sys.argv[1:])
