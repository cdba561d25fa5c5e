"""Run configs to and from JSON-ready dicts (as checkpoints save them), and typed field values."""

import dataclasses
import types
import typing
from typing import Any

from nanogptoss_jax.errors import UsageError
from nanogptoss_jax.model import execution, registry
from nanogptoss_jax.training.run_config import RunConfig

# How a saved config names its model class; the JSON holds the kind, never the class path.
MODEL_KIND_KEY = "model_kind"
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
NONE_WORDS = ("none", "null")


class ConfigOverrideError(UsageError):
  """A command-line override or saved config names an unknown key or holds a badly typed value."""


def _type_name(tp: Any) -> str:
  """`int | None` as a user would write it."""
  if tp is type(None):
    return "None"
  if isinstance(tp, type):
    return tp.__name__
  return " | ".join(_type_name(arg) for arg in typing.get_args(tp)) or str(tp)


def _parse_scalar(tp: type, value: Any) -> Any:
  """`value` (a string, or an already typed value) as an instance of `tp`; ValueError if not."""
  if isinstance(value, str):
    text = value.strip()
    if tp is bool:
      if text.lower() in TRUE_WORDS:
        return True
      if text.lower() in FALSE_WORDS:
        return False
      raise ValueError(value)
    if tp is str:
      return value
    if tp in (int, float):
      return tp(text)  # int("1.5") and float("x") raise ValueError
    raise ValueError(value)
  # Typed values (from a dict or JSON): bool is an int subclass, so refuse it for numbers.
  if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
    return value
  raise ValueError(value)


def _parse_value(key: str, tp: Any, value: Any) -> Any:
  """`value` parsed by the declared field type `tp` (scalars, `X | None`, `tuple[X, ...]`)."""
  if typing.get_origin(tp) is tuple:
    # From JSON a list; from the command line comma-separated text ("" is the empty tuple).
    items = ([item for item in value.split(",") if item.strip()] if isinstance(value, str)
             else value)
    if not isinstance(items, (list, tuple)):
      raise ConfigOverrideError(f"bad value for {key!r}: expected {_type_name(tp)}, got {value!r}")
    return tuple(_parse_value(key, typing.get_args(tp)[0], item) for item in items)
  is_union = typing.get_origin(tp) in (typing.Union, types.UnionType)
  union_args = typing.get_args(tp) if is_union else (tp,)
  if type(None) in union_args and (value is None or (isinstance(value, str)
                                                     and value.strip().lower() in NONE_WORDS)):
    return None
  for arg in union_args:
    if arg is type(None):
      continue
    try:
      return _parse_scalar(arg, value)
    except (TypeError, ValueError):
      continue
  raise ConfigOverrideError(f"bad value for {key!r}: expected {_type_name(tp)}, got {value!r}")


def optional_section(tp: Any) -> type | None:
  """The dataclass X of a field typed `X | None` (a sub-config that may be off), else None."""
  if typing.get_origin(tp) not in (typing.Union, types.UnionType):
    return None
  args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
  if len(args) == 1 and dataclasses.is_dataclass(args[0]) and len(typing.get_args(tp)) == 2:
    return args[0]
  return None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
  """A JSON-ready dict of `cfg`, naming the model's kind so `config_from_dict` can rebuild it."""
  return {MODEL_KIND_KEY: registry.kind_of(cfg.model), **dataclasses.asdict(cfg)}


def _from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else name
    if name not in fields:
      names = ", ".join(sorted(fields))
      raise ConfigOverrideError(f"unknown key {key!r} in saved config; valid keys: {names}")
    if dataclasses.is_dataclass(hints[name]):  # a nested section (data.chat)
      if not isinstance(value, dict):
        raise ConfigOverrideError(f"bad value for {key!r}: expected a section, got {value!r}")
      kwargs[name] = _from_dict(hints[name], value, key)
    else:
      kwargs[name] = _parse_value(key, hints[name], value)
  return cls(**kwargs)


def _with_execution_section(d: dict[str, Any]) -> dict[str, Any]:
  """A config saved before the execution config existed: its dtypes, kernel choices and layouts
  sat in `model` and the mesh's fsdp size in `train`; they move to `execution`."""
  if "execution" in d:
    return d
  model, train = dict(d.get("model", {})), dict(d.get("train", {}))
  moved = {name: model.pop(name) for name in execution.FIELDS if name in model}
  for name in ("fsdp", "expert"):  # mesh sizes once named under `train`
    if name in train:
      moved[name] = train.pop(name)
  return {**d, "model": model, "train": train, "execution": moved}


def config_from_dict(d: dict[str, Any]) -> RunConfig:
  """The RunConfig that `config_to_dict` (maybe via JSON) produced; missing fields take defaults."""
  d = _with_execution_section(dict(d))
  kind = d.pop(MODEL_KIND_KEY, None)
  if kind not in registry.MODELS:
    raise ConfigOverrideError(f"saved config's {MODEL_KIND_KEY} must be one of "
                              f"{sorted(registry.MODELS)} (got {kind!r})")
  if "model" not in d:
    raise ConfigOverrideError("saved config has no 'model' section")
  sub_configs = {f.name: typing.get_type_hints(RunConfig)[f.name]
                 for f in dataclasses.fields(RunConfig) if f.name not in ("model", "run_dir")}
  kwargs = {"model": _from_dict(registry.config_class(kind), d.pop("model"), "model")}
  for name, value in d.items():
    if name in sub_configs and optional_section(sub_configs[name]):
      kwargs[name] = (None if value is None else
                      _from_dict(optional_section(sub_configs[name]), value, name))
    elif name in sub_configs:
      kwargs[name] = _from_dict(sub_configs[name], value, name)
    elif name == "run_dir":
      kwargs[name] = _parse_value(name, str, value)
    else:
      names = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))
      raise ConfigOverrideError(f"unknown key {name!r} in saved config; valid keys: {names}")
  return RunConfig(**kwargs)
