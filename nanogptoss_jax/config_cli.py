"""Run configs from the command line: load `configs/<name>.py`, apply typed `--config.KEY=VALUE`."""

import dataclasses
import importlib.util
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from nanogptoss_jax.config import ConfigError, Gpt2Config, GptOssConfig
from nanogptoss_jax.run_config import FULL_VOCAB_SIZE, RunConfig

CONFIG_FLAG = "--config"
# How a saved config names its model class; the JSON holds the name, never the class path.
MODEL_KINDS = {"gpt_oss": GptOssConfig, "gpt2": Gpt2Config}
MODEL_KIND_KEY = "model_kind"
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
NONE_WORDS = ("none", "null")


class ConfigOverrideError(ValueError):
  """A command-line override or saved config names an unknown key or holds a badly typed value."""


class ConfigFileError(ValueError):
  """A config file cannot be imported or does not build a RunConfig."""


def load_config_file(path: str | os.PathLike) -> RunConfig:
  """Imports the Python file at `path` and returns its `get_config()`."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {str(path)!r} does not exist")
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
  return cfg


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
  """`value` parsed by the declared field type `tp` (scalars and `X | None`)."""
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
  direct = {name: (_rebuild(getattr(node, name), sub) if isinstance(sub, dict) else sub)
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


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
  """A JSON-ready dict of `cfg`, naming the model's kind so `config_from_dict` can rebuild it."""
  kinds = {cls: kind for kind, cls in MODEL_KINDS.items()}
  return {MODEL_KIND_KEY: kinds[type(cfg.model)], **dataclasses.asdict(cfg)}


def _from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  for name, value in values.items():
    key = f"{prefix}.{name}" if prefix else name
    if name not in fields:
      names = ", ".join(sorted(fields))
      raise ConfigOverrideError(f"unknown key {key!r} in saved config; valid keys: {names}")
    kwargs[name] = _parse_value(key, hints[name], value)
  return cls(**kwargs)


def config_from_dict(d: dict[str, Any]) -> RunConfig:
  """The RunConfig that `config_to_dict` (maybe via JSON) produced; missing fields take defaults."""
  d = dict(d)
  kind = d.pop(MODEL_KIND_KEY, None)
  if kind not in MODEL_KINDS:
    raise ConfigOverrideError(f"saved config's {MODEL_KIND_KEY} must be one of "
                              f"{sorted(MODEL_KINDS)} (got {kind!r})")
  if "model" not in d:
    raise ConfigOverrideError("saved config has no 'model' section")
  sub_configs = {f.name: typing.get_type_hints(RunConfig)[f.name]
                 for f in dataclasses.fields(RunConfig) if f.name not in ("model", "run_dir")}
  kwargs = {"model": _from_dict(MODEL_KINDS[kind], d.pop("model"), "model")}
  for name, value in d.items():
    if name in sub_configs:
      kwargs[name] = _from_dict(sub_configs[name], value, name)
    elif name == "run_dir":
      kwargs[name] = _parse_value(name, str, value)
    else:
      names = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))
      raise ConfigOverrideError(f"unknown key {name!r} in saved config; valid keys: {names}")
  return RunConfig(**kwargs)


def _run_rules(cfg: RunConfig) -> list[tuple[bool, str]]:
  """(holds, message) for each cross-field rule of a run; messages name fields and values."""
  data, optim, train, model = cfg.data, cfg.optim, cfg.train, cfg.model
  vocab = data.compact_vocab_size if data.compact_vocab_size > 0 else FULL_VOCAB_SIZE
  vocab_source = ("data.compact_vocab_size" if data.compact_vocab_size > 0
                  else "FULL_VOCAB_SIZE (data.compact_vocab_size=0)")
  rules = [
      (model.vocab_size == vocab,
       f"model.vocab_size={model.vocab_size} must equal {vocab_source}={vocab}"),
      (0 <= data.compact_vocab_size <= FULL_VOCAB_SIZE,
       f"data.compact_vocab_size={data.compact_vocab_size} must be in [0, {FULL_VOCAB_SIZE}]"),
      (data.val_windows > 0, f"data.val_windows={data.val_windows} must be > 0"),
      (data.max_stories >= 0, f"data.max_stories={data.max_stories} must be >= 0 (0: all)"),
      (train.steps > 0, f"train.steps={train.steps} must be > 0"),
      (train.grad_accum > 0, f"train.grad_accum={train.grad_accum} must be > 0"),
      (train.batch_size > 0 and train.batch_size % max(train.grad_accum, 1) == 0,
       f"train.batch_size={train.batch_size} must be a positive multiple of "
       f"train.grad_accum={train.grad_accum}"),
      (train.context_len > 0, f"train.context_len={train.context_len} must be > 0"),
      (train.log_every > 0, f"train.log_every={train.log_every} must be > 0"),
      (train.eval_every > 0, f"train.eval_every={train.eval_every} must be > 0"),
      (train.ckpt_every > 0, f"train.ckpt_every={train.ckpt_every} must be > 0"),
      (train.keep_checkpoints > 0,
       f"train.keep_checkpoints={train.keep_checkpoints} must be > 0"),
      (train.sample_tokens >= 0, f"train.sample_tokens={train.sample_tokens} must be >= 0"),
      (train.load_balance_coef >= 0 and train.router_z_coef >= 0,
       f"train.load_balance_coef={train.load_balance_coef} and "
       f"train.router_z_coef={train.router_z_coef} must be >= 0"),
      (train.fsdp > 0, f"train.fsdp={train.fsdp} must be > 0"),
      (optim.lr > 0, f"optim.lr={optim.lr} must be > 0"),
      (0 <= optim.min_lr <= optim.lr,
       f"optim.min_lr={optim.min_lr} must be in [0, optim.lr={optim.lr}]"),
      # warmup_steps may exceed train.steps: the schedule clips it.
      (optim.warmup_steps >= 0, f"optim.warmup_steps={optim.warmup_steps} must be >= 0"),
      (optim.weight_decay >= 0, f"optim.weight_decay={optim.weight_decay} must be >= 0"),
      (0 <= optim.beta1 < 1 and 0 <= optim.beta2 < 1,
       f"optim.beta1={optim.beta1} and optim.beta2={optim.beta2} must be in [0, 1)"),
      (optim.eps > 0, f"optim.eps={optim.eps} must be > 0"),
      (optim.grad_clip >= 0, f"optim.grad_clip={optim.grad_clip} must be >= 0 (0: off)"),
      (bool(cfg.run_dir.strip()), "run_dir must not be empty"),
  ]
  if isinstance(model, Gpt2Config):
    # Learned positions: a window longer than the table has no embedding for its tail.
    rules.append((train.context_len <= model.max_position_embeddings,
                  f"train.context_len={train.context_len} must be <= "
                  f"model.max_position_embeddings={model.max_position_embeddings}"))
  return rules


def validate_run_config(cfg: RunConfig) -> None:
  """Raises ConfigError listing every cross-field rule that `cfg` breaks."""
  broken = [message for holds, message in _run_rules(cfg) if not holds]
  if broken:
    raise ConfigError("invalid run config:\n  " + "\n  ".join(broken))
