"""Where a run's weights come from: its seed, or `train.init_from` (a run directory or a
published gpt-oss directory) with a content hash; and reading a finished run (load_checkpoint).

A run's frozen parameters are never written to its checkpoints: resuming or loading rebuilds
them from the same seed and source, after checking the source's hash has not changed.
"""

import dataclasses
import hashlib
import logging
import pathlib

import jax
from flax import nnx

from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import axes, layer_stack
from nanogptoss_jax.model.gptoss import layer_layout
from nanogptoss_jax.model.quantize import quantize
from nanogptoss_jax.parallel import rules
from nanogptoss_jax.pretrained import hub
from nanogptoss_jax.training import checkpoints as ckpt
from nanogptoss_jax.training.checksums import CHECKSUMS_FILE
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.state import (TrainState, abstract_run_model, abstract_train_state,
                                            init_train_state, merge_model, run_model, split_model,
                                            trainable_pattern)

HASH_CHUNK = 1 << 24
PUBLISHED_FILES = ("config.json", "*.safetensors", "original/config.json", "original/*.safetensors")


class SourceError(UserError, ValueError):
  """`init_from` names nothing loadable, or a source that changed since the run started."""


def is_run_directory(path: pathlib.Path) -> bool:
  return (path / ckpt.BEST_DIR).is_dir() or (path / ckpt.PERIODIC_DIR).is_dir()


def _hash_files(files: list[pathlib.Path], root: pathlib.Path) -> str:
  digest = hashlib.sha256()
  for path in sorted(files):
    digest.update(str(path.relative_to(root)).encode() + b"\0")
    with open(path, "rb") as f:
      while chunk := f.read(HASH_CHUNK):
        digest.update(chunk)
  return digest.hexdigest()


def _best_step_dir(root: pathlib.Path, field: str = "init_from") -> pathlib.Path:
  """The step directory load_checkpoint reads first: best/, else the newest periodic one."""
  for sub in (ckpt.BEST_DIR, ckpt.PERIODIC_DIR):
    steps = sorted((int(p.name) for p in (root / sub).glob("*") if p.name.isdigit()),
                   reverse=True) if (root / sub).is_dir() else []
    if steps:
      return root / sub / str(steps[0])
  raise SourceError(f"{field}={root} holds no checkpoint step")


def describe_source(path: str, field: str = "init_from") -> dict:
  """{"path", "sha256"} of an init_from source (or of the config `field` naming one, e.g. a
  teacher): the bytes of the run step or published files that are read (a run step's sealed
  checksums stand for its files)."""
  if hub.is_hub_id(path):  # owner/name[/folder][@revision]: its fetched files (cached once)
    path = hub.resolve(path)
  root = pathlib.Path(path)
  if not root.is_dir():
    raise SourceError(f"{field}={path} is not a directory; give a run directory (train.py's "
                      "run_dir), a published gpt-oss checkpoint directory or a hub id")
  if is_run_directory(root):
    step = _best_step_dir(root, field)
    sealed = step / CHECKSUMS_FILE
    files = [sealed] if sealed.is_file() else [p for p in step.rglob("*") if p.is_file()]
    return {"path": str(root.resolve()), "sha256": _hash_files(files, step)}
  files = sorted({p for pattern in PUBLISHED_FILES for p in root.glob(pattern)})
  if not any(p.suffix == ".safetensors" for p in files):
    raise SourceError(f"{field}={path} holds neither checkpoints/ nor best/ (a run) nor "
                      "*.safetensors (a published checkpoint)")
  logging.info("hashing %d files of %s", len(files), root)
  return {"path": str(root.resolve()), "sha256": _hash_files(files, root)}


def source_tokenizer(cfg: RunConfig):
  """The tokenizer of init_from's run, whose model ids its weights were trained on; None when
  the run starts from its seed or from a published checkpoint (the full vocabulary)."""
  root = pathlib.Path(cfg.train.init_from)
  if not cfg.train.init_from or not is_run_directory(root):
    return None
  ckpt.use_run_tokenizer_file(root)  # a new run directory carries no BPE file yet
  return run_description(root)[1]


def run_description(root: pathlib.Path) -> tuple[RunConfig, object]:
  """(config, tokenizer) of a run directory, read from the step load_checkpoint reads first
  (every step of a run holds the same ones)."""
  step = _best_step_dir(root)
  manager = ckpt.read_only_manager(step.parent)
  try:
    _, _, meta = ckpt.restore_step(manager, int(step.name), None, meta_only=True)
  finally:
    manager.close()
  return ckpt.read_meta(meta)


def check_source(saved: dict | None, cfg: RunConfig) -> None:
  """Raises unless the run's init_from still holds the bytes it started from."""
  if not cfg.train.init_from:
    return
  current = describe_source(cfg.train.init_from)
  if saved is not None and saved.get("sha256") != current["sha256"]:
    raise SourceError(
        f"init_from={cfg.train.init_from} changed since this run started (sha256 "
        f"{saved.get('sha256', '?')[:12]}... then, {current['sha256'][:12]}... now): the frozen "
        "weights its checkpoints leave out cannot be rebuilt. Put the original back, or start "
        "a new --config.run_dir (nothing was deleted)")


def _base_model(source: str, cfg: RunConfig):
  """The model stored at `source`, its architecture checked against the run's."""
  root = pathlib.Path(source)
  if is_run_directory(root):
    base, _ = load_checkpoint(root)
  else:
    from nanogptoss_jax.pretrained.load import load_pretrained  # noqa: PLC0415 - heavy, rare
    base, _ = load_pretrained(str(root), execution=cfg.execution.replace(
        layers_impl="loop", dense_format="float"), mesh=None)
  if cfg.execution.dense_format != "float":  # int8 from the source's own float weights
    base = quantize(base, experts=None, dense=cfg.execution.dense_format)
  mine = dataclasses.replace(cfg.model, stop_tokens=())
  theirs = dataclasses.replace(base.cfg, stop_tokens=())
  if type(mine) is not type(theirs) or mine != theirs:
    differ = [f.name for f in dataclasses.fields(mine)
              if getattr(mine, f.name) != getattr(theirs, f.name, None)]
    raise SourceError(f"init_from={source} holds another model: {', '.join(differ)} differ "
                      f"from the run's config (theirs: "
                      f"{ {name: getattr(theirs, name, None) for name in differ} })")
  return base


def initial_model(cfg: RunConfig):
  """The run's model before its first step: the seed's weights, then init_from's where the
  source has them (parameters it lacks, e.g. adapters, keep the seed's values)."""
  model = run_model(cfg)
  if not cfg.train.init_from:
    return model
  base = _base_model(cfg.train.init_from, cfg)
  layout = (layer_layout(cfg.model, cfg.execution) if hasattr(cfg.model, "num_experts")
            else layer_stack.LOOP)
  source = dict(nnx.to_flat_state(layer_stack.to_layout(nnx.state(base, nnx.Param), layout)))
  del base
  filled = 0
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path in source:
      value = source.pop(path).get_value()
      if value.shape != variable.shape:
        raise SourceError(f"init_from={cfg.train.init_from}: {'.'.join(map(str, path))} has "
                          f"shape {value.shape}, the run needs {variable.shape}")
      variable.set_value(value.astype(variable.get_value().dtype))
      filled += 1
  logging.info("init_from %s: %d parameters loaded", cfg.train.init_from, filled)
  return model


def frozen_params(cfg: RunConfig, abstract_frozen):
  """The frozen parameters a run's checkpoints leave out, rebuilt from its seed and source."""
  if not jax.tree.leaves(abstract_frozen):
    return abstract_frozen
  return split_model(initial_model(cfg), trainable_pattern(cfg))[2]


def load_step(manager, step: int):
  """(model, tokenizer) of one checkpoint step, in the loop layout (a cached decode step that
  slices layers out of scanned stacks measured 1.5x slower: docs/benchmarks.md)."""
  _, _, meta = ckpt.restore_step(manager, step, None, meta_only=True)
  cfg, tokenizer = ckpt.read_meta(meta)
  # generate()'s default stop ids come from the tokenizer: a compact vocabulary numbers
  # <|endoftext|> differently.
  cfg = dataclasses.replace(cfg, model=cfg.model.replace(stop_tokens=tuple(tokenizer.stop_ids)),
                            execution=cfg.execution.replace(layers_impl=layer_stack.LOOP))
  graphdef, abstract_state, _ = abstract_train_state(cfg)
  state, _, _ = ckpt.restore_step(manager, step, abstract_state)
  if trainable_pattern(cfg):  # a run training every weight holds them all in its steps
    check_source(meta.get(ckpt.SOURCE_KEY), cfg)
  state = dataclasses.replace(state, frozen=frozen_params(cfg, abstract_state.frozen))
  return merge_model(graphdef, state), tokenizer


def load_checkpoint(run_dir: str | pathlib.Path):
  """(model, tokenizer) from a run directory: its best-validation checkpoint, else the newest
  readable periodic one. Says which step it loaded and which it skipped; moves nothing."""
  root = pathlib.Path(run_dir)
  train_hint = (f"train one with `python train.py --config configs/nano.py "
                f"--config.run_dir={root}`")
  if not root.is_dir():
    raise ckpt.CheckpointError(f"no run directory {root}; {train_hint}")
  ckpt.use_run_tokenizer_file(root)
  skipped = []
  for sub in (ckpt.BEST_DIR, ckpt.PERIODIC_DIR):
    if not (root / sub).is_dir():
      continue
    manager = ckpt.read_only_manager(root / sub)
    for step in sorted(manager.all_steps(), reverse=True):
      try:
        model, tokenizer = load_step(manager, step)
      except (ckpt.CheckpointError, SourceError):
        raise  # a broken run or base, not a broken step: older steps would not help
      except Exception as error:  # noqa: BLE001 - any failure means "this step is unusable"
        skipped.append(f"{sub}/{step} ({ckpt.short_error(error)})")
        logging.warning("skipped unreadable checkpoint %s/%s/%d: %s", root, sub, step,
                        ckpt.short_error(error))
        continue
      logging.info("loaded %s/%s/%d%s", root, sub, step,
                   f" (skipped {', '.join(skipped)})" if skipped else "")
      return model, tokenizer
  if skipped:
    raise ckpt.CheckpointError(f"no readable checkpoint in {root}: skipped "
                               f"{'; '.join(skipped)}. The files were left in place.")
  raise ckpt.CheckpointError(f"no checkpoint under {root} (expected {root}/{ckpt.BEST_DIR}/<step>"
                             f" or {root}/{ckpt.PERIODIC_DIR}/<step>); {train_hint}")


def initial_state(cfg: RunConfig, tx, shardings) -> TrainState:
  """The run's first train state, placed on `shardings`."""
  if cfg.train.init_from:  # loaded eagerly: the source's arrays are already on devices
    return jax.device_put(init_train_state(initial_model(cfg), tx, trainable_pattern(cfg)),
                          shardings)
  init = lambda: init_train_state(initial_model(cfg), tx, trainable_pattern(cfg))
  return jax.jit(init, out_shardings=shardings)()


def state_shardings(cfg: RunConfig, mesh, abstract_state):
  """Where each array of the train state lives: the parallel rules over the model's names."""
  return rules.tree_shardings(mesh, abstract_state,
                              axes.axes_by_path(abstract_run_model(cfg)))


def restored_state(cfg: RunConfig, state: TrainState, meta: dict) -> TrainState:
  """A restored train state with its frozen parameters rebuilt (the source's hash checked;
  a run that trains every weight needs nothing of its source once started)."""
  if trainable_pattern(cfg):
    check_source(meta.get(ckpt.SOURCE_KEY), cfg)
  return dataclasses.replace(state, frozen=frozen_params(cfg, state.frozen))


def source_record(cfg: RunConfig) -> dict | None:
  """What a checkpoint records of the run's init_from (None when it starts from its seed)."""
  return describe_source(cfg.train.init_from) if cfg.train.init_from else None
