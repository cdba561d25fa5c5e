"""Precompute a teacher's rows for offline distillation: `python -m
nanogptoss_jax.commands.teacher_cache --config configs/nano.py --config.train.teacher=DIR
--config.train.kd_mode=top_k [--config.KEY=VALUE ...]`.

    --config PATH            the student's run config (the same one train.py is given)
    --config.KEY=VALUE       override any field; train.kd_mode top_k or sampled, train.kd_k
    --debug                  show tracebacks for user errors too

Writes the cache beside the token cache (data.cache_dir), keyed by the data and the teacher's
hash; training with the same config then reads it instead of running the teacher.
"""

from nanogptoss_jax import cli


def _precompute(argv: list[str]) -> None:
  if cli.wants_help(argv):
    print(__doc__.strip())
    return
  cli.setup_logging()
  from nanogptoss_jax.training.config_files import parse_args  # JAX is heavy to import
  from nanogptoss_jax.training.config_io import ConfigOverrideError
  from nanogptoss_jax.training.teacher_cache import precompute
  cfg, rest = parse_args(argv)
  if rest:
    raise ConfigOverrideError(f"unrecognised arguments: {rest}; use --config PATH and "
                              f"--config.KEY=VALUE (see --help)")
  print(precompute(cfg))


def main(argv: list[str] | None = None) -> None:
  cli.run(_precompute, argv)


if __name__ == "__main__":
  main()
