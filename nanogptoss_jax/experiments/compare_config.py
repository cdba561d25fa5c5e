"""What a GPT-OSS vs GPT-2 comparison runs: its config, its command line, and the run configs."""

import dataclasses
import os
import runpy
import typing
from pathlib import Path

from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.training.config_files import apply_overrides, load_config_file
from nanogptoss_jax.training.config_io import ConfigOverrideError, _parse_value
from nanogptoss_jax.training.run_config import RunConfig, gpt2_twin, validate_run_config

# Model keys (folder prefixes) and their names in the report, GPT-OSS first.
MODELS = {"gpt_oss": "GPT-OSS", "gpt2": "GPT-2"}
# The comparison itself sets these per run; a user override of them would break the pairing.
MANAGED_KEYS = ("run_dir", "train.seed")
# Sampling speed: batch 1, a fixed 16-token prompt, top-k 50 (the seed's sampler), best of 3.
PROMPT_TEXT = ("Once upon a time, there was a little girl named Lily. She loved to play outside "
               "in the sun with her big red ball.")
PROMPT_TOKENS = 16
SAMPLE_TOP_K = 50
SAMPLE_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class CompareConfig:
  """Which GPT-OSS run to compare with its GPT-2 twin, over which seeds, and where to write."""

  base: str  # path of the GPT-OSS run config (configs/<name>.py)
  seeds: tuple[int, ...] = (0, 1, 2)
  out_dir: str = "runs/compare_nano"
  overrides: tuple[str, ...] = ()  # KEY=VALUE for the base run, so for both twins
  sample_tokens: int = 128  # new tokens per timed sampling call

  def __post_init__(self):
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ConfigError(f"seeds must be distinct and non-empty (got {self.seeds!r})")
    if self.sample_tokens <= 0:
      raise ConfigError(f"sample_tokens must be > 0 (got {self.sample_tokens!r})")
    if not self.out_dir.strip():
      raise ConfigError("out_dir must not be empty")


def load_compare_config(path: str | os.PathLike) -> CompareConfig:
  """The CompareConfig that `get_config()` in the Python file at `path` returns."""
  if not Path(path).is_file():
    raise FileNotFoundError(f"compare config {str(path)!r} does not exist")
  cfg = runpy.run_path(str(path))["get_config"]()
  if not isinstance(cfg, CompareConfig):
    raise ConfigError(f"get_config() in {str(path)!r} returned {type(cfg).__name__}, "
                      "expected CompareConfig")
  return cfg


def _parse_field(name: str, text: str):
  """`text` typed as CompareConfig field `name` (tuples comma-separated), as run overrides are."""
  hints = typing.get_type_hints(CompareConfig)
  if name not in hints:
    raise ConfigOverrideError(f"unknown key {name!r}; valid keys: {', '.join(sorted(hints))}")
  return _parse_value(name, hints[name], text)


def parse_args(argv: list[str]) -> tuple[CompareConfig, list[str]]:
  """(CompareConfig, run overrides) from `--config PATH`, `--config.KEY=V` and `--run.KEY=V`."""
  path, changes, run_overrides = None, {}, []
  args = list(argv)
  while args:
    flag, sep, value = args.pop(0).partition("=")
    if flag != "--config" and not flag.startswith(("--config.", "--run.")):
      raise ConfigOverrideError(f"unrecognised argument {flag!r}; use --config PATH, "
                                "--config.KEY=VALUE (comparison) or --run.KEY=VALUE (both run "
                                "configs); see --help")
    if not sep:
      if not args:
        raise ConfigOverrideError(f"{flag} needs a value")
      value = args.pop(0)
    if flag == "--config":
      path = value
    elif flag.startswith("--config."):
      key = flag.removeprefix("--config.")
      changes[key] = _parse_field(key, value)
    else:
      run_overrides.append(f"{flag.removeprefix('--run.')}={value}")
  if path is None:
    raise ConfigOverrideError("missing --config PATH (e.g. --config configs/compare_nano.py)")
  return dataclasses.replace(load_compare_config(path), **changes), run_overrides


def run_configs(cmp: CompareConfig,
                run_overrides: list[str] = ()) -> list[tuple[str, int, RunConfig]]:
  """(model key, seed, run config) for every run, seed-major so machine drift hits both models."""
  overrides = [*cmp.overrides, *run_overrides]
  managed = [item for item in overrides if item.partition("=")[0].strip() in MANAGED_KEYS]
  if managed:
    raise ConfigError(f"{managed} cannot be overridden: the comparison sets "
                      f"{' and '.join(MANAGED_KEYS)} per run "
                      "(use --config.seeds and --config.out_dir)")
  # Overrides go to the GPT-OSS run before its twin is derived, so both twins get them.
  base = apply_overrides(load_config_file(cmp.base), list(overrides))
  runs = []
  for seed in cmp.seeds:
    seeded = apply_overrides(base, {"train.seed": seed})
    for model, cfg in (("gpt_oss", seeded), ("gpt2", gpt2_twin(seeded))):
      cfg = dataclasses.replace(cfg, run_dir=str(Path(cmp.out_dir) / f"{model}_seed{seed}"))
      validate_run_config(cfg)
      runs.append((model, seed, cfg))
  # GPT-2 learns one embedding per position, up to the training window only.
  context_len = base.train.context_len
  if PROMPT_TOKENS + cmp.sample_tokens > context_len:
    raise ConfigError(f"sample_tokens={cmp.sample_tokens} plus the {PROMPT_TOKENS}-token prompt "
                      f"exceeds train.context_len={context_len}, GPT-2's last position")
  return runs
