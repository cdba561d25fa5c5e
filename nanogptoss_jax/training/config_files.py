"""Run configs from the command line: load `configs/<name>.py[:variant]`, apply typed
`--config.KEY=VALUE` overrides (the ml_collections `config_flags` convention)."""

import dataclasses
import importlib.util
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.training.config_io import (NONE_WORDS, ConfigOverrideError, _parse_value,
                                               optional_section)
from nanogptoss_jax.training.run_config import RunConfig, gpt2_twin, validate_run_config

CONFIG_FLAG = "--config"
# `configs/nano.py:gpt2` is the GPT-2 twin of nano's run: one mechanism for every config.
VARIANTS = {"gpt2": gpt2_twin}


class ConfigFileError(UserError, ValueError):
  """A config file cannot be imported or does not build a RunConfig."""


def load_config_file(spec: str | os.PathLike) -> RunConfig:
  """Imports the Python file `spec` names and returns its `get_config()`.

  `spec` may end in `:variant` (one of VARIANTS): `configs/nano.py:gpt2` is nano's GPT-2 twin.
  """
  path, _, variant = str(spec).rpartition(":") if str(spec).endswith(
      tuple(f":{name}" for name in VARIANTS)) else (str(spec), "", "")
  path = Path(path)
  if not path.is_file():
    raise ConfigFileError(f"config file {str(path)!r} does not exist (see configs/ for the "
                          "configs that come with the project)")
  # A name per file, so two configs with the same stem in different folders do not collide;
  # registered in sys.modules because dataclasses defined in the file look themselves up there.
  module_name = "_nanogptoss_config_" + re.sub(r"\W", "_", str(path.resolve()))
  spec = importlib.util.spec_from_file_location(module_name, path)
  if spec is None or spec.loader is None:
    raise ConfigFileError(f"cannot import config file {str(path)!r} (is it a .py file?)")
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[module_name]  # leave no half-imported module behind
    raise
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigFileError(f"config file {str(path)!r} must define get_config() -> RunConfig")
  cfg = get_config()
  if not isinstance(cfg, RunConfig):
    raise ConfigFileError(f"get_config() in {str(path)!r} returned {type(cfg).__name__}, "
                          "expected RunConfig")
  return VARIANTS[variant](cfg) if variant else cfg


def _valid_keys_message(node: Any, prefix: str) -> str:
  names = ", ".join(sorted(f.name for f in dataclasses.fields(node)))
  where = f"under {prefix!r}" if prefix else "at the top level"
  return f"valid keys {where}: {names}"


def _nest_changes(cfg: RunConfig, overrides: dict[str, Any]) -> dict[str, Any]:
  """{"optim.lr": "1e-3"} -> {"optim": {"lr": 1e-3}}, every key checked and every value typed."""
  changes: dict[str, Any] = {}
  for key, value in overrides.items():
    node, level, prefix = cfg, changes, ""
    parts = key.split(".")
    for i, part in enumerate(parts):
      names = {f.name for f in dataclasses.fields(node)}
      if part not in names:
        raise ConfigOverrideError(f"unknown key {key!r}; {_valid_keys_message(node, prefix)}")
      child = getattr(node, part)
      path = f"{prefix}.{part}" if prefix else part
      is_last = i == len(parts) - 1
      section = optional_section(typing.get_type_hints(type(node))[part])
      if section is not None and is_last:
        # A sub-config that may be off (lora): `none` turns it off, `default` on as it comes.
        word = str(value).strip().lower()
        if word not in NONE_WORDS + ("default",):
          raise ConfigOverrideError(
              f"{key!r} takes none or default; set its fields instead "
              f"({_valid_keys_message(section, path)})")
        level[part] = None if word in NONE_WORDS else section()
        continue
      if section is not None and child is None:
        child = section()  # `lora.rank=4` on a run without LoRA: the defaults, then the change
        level.setdefault(part, {})["__section__"] = section
      if dataclasses.is_dataclass(child):
        if is_last:
          raise ConfigOverrideError(
              f"cannot set the whole sub-config {key!r}; set its fields instead "
              f"({_valid_keys_message(child, path)})")
        node, prefix = child, path
        level = level.setdefault(part, {})
      elif not is_last:
        raise ConfigOverrideError(f"unknown key {key!r}: {path!r} is a value, not a sub-config")
      else:
        field_type = typing.get_type_hints(type(node))[part]
        level[part] = _parse_value(key, field_type, value)
  return changes


def _rebuild(node: Any, changes: dict[str, Any]) -> Any:
  """`node` with nested `changes`, one dataclasses.replace per dataclass so validation runs once."""
  def child(name, sub):
    current = getattr(node, name)
    if current is None and isinstance(sub, dict) and "__section__" in sub:
      current = sub["__section__"]()  # an optional sub-config switched on by a field change
    sub = {key: value for key, value in sub.items() if key != "__section__"}
    return _rebuild(current, sub)

  direct = {name: (child(name, sub) if isinstance(sub, dict) else sub)
            for name, sub in changes.items()}
  return dataclasses.replace(node, **direct)


def _split_assignments(overrides: list[str]) -> dict[str, str]:
  pairs = {}
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise ConfigOverrideError(f"override {item!r} must look like KEY=VALUE (e.g. optim.lr=1e-3)")
    pairs[key.strip()] = value
  return pairs


def apply_overrides(cfg: RunConfig, overrides: dict[str, Any] | list[str]) -> RunConfig:
  """`cfg` with dotted-key overrides applied; all are applied together, later duplicates win."""
  if isinstance(overrides, list):
    overrides = _split_assignments(overrides)
  # Applied in one rebuild, so a pair of fields that must change together (heads and kv heads)
  # is never checked half-changed; a model ConfigError propagates as is.
  return _rebuild(cfg, _nest_changes(cfg, overrides))


def parse_args(argv: list[str]) -> tuple[RunConfig, list[str]]:
  """(validated RunConfig, remaining args) from `--config PATH` and `--config.KEY[=| ]VALUE`."""
  path, overrides, rest = None, {}, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    flag, sep, inline_value = arg.partition("=")
    if flag == CONFIG_FLAG or flag.startswith(CONFIG_FLAG + "."):
      if sep:
        value = inline_value
      elif i + 1 < len(argv):
        i += 1
        value = argv[i]
      else:
        raise ConfigOverrideError(f"{flag} needs a value")
      if flag == CONFIG_FLAG:
        if path is not None:
          raise ConfigOverrideError(f"{CONFIG_FLAG} given twice ({path!r} and {value!r})")
        path = value
      else:
        overrides[flag[len(CONFIG_FLAG) + 1:]] = value
    else:
      rest.append(arg)
    i += 1
  if path is None:
    raise ConfigOverrideError(f"missing {CONFIG_FLAG} PATH (e.g. {CONFIG_FLAG} configs/nano.py)")
  cfg = apply_overrides(load_config_file(path), overrides)
  validate_run_config(cfg)
  return cfg, rest
