"""Train a model: `python train.py --config configs/nano.py [--config.KEY=VALUE ...]`."""

if __name__ == "__main__":  # first, before the heavy imports: it may restart the process
  from nanogptoss_jax.cpu_malloc import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()

import logging
import sys

from nanogptoss_jax.config_cli import parse_args
from nanogptoss_jax.trainer import train


def main(argv: list[str]) -> None:
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  # absl (pulled in by orbax) logs every checkpoint file operation at INFO; keep ours readable.
  logging.getLogger("absl").setLevel(logging.WARNING)
  cfg, rest = parse_args(argv)
  if rest:
    raise SystemExit(f"unrecognised arguments: {rest}; use --config PATH and --config.KEY=VALUE")
  metrics = train(cfg)
  print({k: v for k, v in metrics.items() if k in ("step", "val_loss", "val_bpb", "train_loss")})


if __name__ == "__main__":
  main(sys.argv[1:])
