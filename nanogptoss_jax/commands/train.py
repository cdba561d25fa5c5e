"""Train a model: `nanogptoss-train --config configs/nano.py [--config.KEY=VALUE ...]`.

    --config PATH[:gpt2]   a run config (configs/*.py); `:gpt2` trains its GPT-2 twin
    --config.KEY=VALUE     override any field, typed (e.g. --config.optim.lr=1e-3)
    --debug                show tracebacks for user errors too

Re-running the same command resumes the run from its latest checkpoint.
"""

from nanogptoss_jax import cli


def _train(argv: list[str]) -> None:
  if cli.wants_help(argv):
    print(__doc__.strip())
    return
  cli.setup_logging()
  # Imported here, after `cli.run` set the process up (JAX is heavy to import).
  from nanogptoss_jax.training.config_files import parse_args
  from nanogptoss_jax.training.config_io import ConfigOverrideError
  from nanogptoss_jax.training.loop import train
  cfg, rest = parse_args(argv)
  if rest:
    raise ConfigOverrideError(f"unrecognised arguments: {rest}; use --config PATH and "
                              f"--config.KEY=VALUE (see --help)")
  metrics = train(cfg)
  print({k: v for k, v in metrics.items() if k in ("step", "val_loss", "val_bpb", "train_loss")})


def main(argv: list[str] | None = None) -> None:
  cli.run(_train, argv)


if __name__ == "__main__":
  main()
