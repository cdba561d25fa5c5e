"""Orbax checkpoints of the whole run: train state, data-iterator state, config, tokenizer.

Layout under the run directory: `checkpoints/<step>/` (the last K, periodic) and `best/<step>/`
(lowest validation loss). Orbax writes each step into a temporary directory and renames it when
complete, so a crash mid-save leaves nothing that looks like a checkpoint.
"""

import dataclasses
import logging
import math
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from nanogptoss_jax.data.bpe import BPE_FILE_NAME, use_bpe_file, write_bpe_file
from nanogptoss_jax.data.tokenizer import Tokenizer
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.model import layer_stack
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.gptoss import layer_layout
from nanogptoss_jax.training.checksums import seal, verify
from nanogptoss_jax.training.config_io import config_from_dict, config_to_dict
from nanogptoss_jax.training.run_config import RunConfig

ITEMS = ("state", "data", "meta")
PERIODIC_DIR, BEST_DIR = "checkpoints", "best"
UNREADABLE_DIR = "unreadable"  # where a resume moves the periodic steps it could not read
TOKENIZER_DIR = "tokenizer"  # the run's copy of the BPE file
LAYER_LAYOUT_KEY = "layer_layout"  # how the saved state stores its blocks (model/layer_stack.py)
# The parameter names a step was written with: steps without this key call the MoE's router
# `gate`, as the reference does.
PARAM_NAMES_KEY, PARAM_NAMES = "param_names", 2
LEGACY_NAMES = {"router": "gate"}
SOURCE_KEY = "init_from"  # where the run's weights started: {"path", "sha256"}, or absent


class CheckpointError(UserError, RuntimeError):
  """No usable checkpoint where one was expected."""


def _is_key(leaf) -> bool:
  return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  """Typed PRNG keys (dropout streams) stored as their raw uint32 data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_keys_to_data(tree):
  return jax.tree.map(
      lambda x: jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x, tree)


def _key_impl(ref):
  # An abstract key (ShapeDtypeStruct) carries its PRNG implementation only in its dtype.
  return ref.dtype._impl if isinstance(ref, jax.ShapeDtypeStruct) else jax.random.key_impl(ref)


def _data_to_keys(tree, like):
  return jax.tree.map(lambda x, ref: jax.random.wrap_key_data(x, impl=_key_impl(ref))
                      if _is_key(ref) else x, tree, like)


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class RunCheckpoints:
  """Periodic and best-validation checkpoint managers for one run directory."""

  def __init__(self, run_dir: str | pathlib.Path, keep: int = 3):
    root = self.root = pathlib.Path(run_dir).absolute()
    options = dict(create=True, enable_async_checkpointing=True)
    # Orbax names its cross-process barriers after the step, so with several processes the two
    # managers saving the same step would join each other's barriers ("already ongoing") and
    # hang until timeout; a distinct prefix per manager keeps them apart.
    self.periodic = ocp.CheckpointManager(
        root / PERIODIC_DIR, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options,
                                             multiprocessing_options=_barrier_prefix(PERIODIC_DIR)))
    self._unsealed = []  # steps saved (asynchronously) but not yet sealed
    self.best = ocp.CheckpointManager(
        root / BEST_DIR, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, **options,
                                             multiprocessing_options=_barrier_prefix(BEST_DIR)))

  def save(self, step: int, state, data_state: dict, meta: dict, *, best: bool = False) -> None:
    """Saves all of `state` but its frozen parameters, which a restore rebuilds from where the
    run started (meta's init_from and seed)."""
    managers = [self.periodic] + ([self.best] if best else [])
    state = dataclasses.replace(state, frozen=None)
    try:
      self._seal_finished()
      for manager in managers:
        if step in manager.all_steps():
          continue
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=True)
        self._unsealed.append(pathlib.Path(manager.directory) / str(step))
    except Exception as error:  # noqa: BLE001 - a failed write (a full disk) or an earlier one
      raise self._write_error(error) from error

  def _seal_finished(self) -> None:
    """Waits for the writes in flight, then seals the steps they finished."""
    self.periodic.wait_until_finished()
    self.best.wait_until_finished()
    if jax.process_index() == 0:
      for step_dir in self._unsealed:
        seal(step_dir)
    self._unsealed.clear()

  def wait(self) -> None:
    try:
      self._seal_finished()
    except Exception as error:  # noqa: BLE001 - the background write failed
      raise self._write_error(error) from error

  def _write_error(self, error: Exception) -> "CheckpointError":
    return CheckpointError(
        f"could not write a checkpoint in {self.root} ({short_error(error)}); is the disk full? "
        "The checkpoints saved before are intact: make room, then rerun the same command to "
        "resume from them")

  def close(self) -> None:
    self.periodic.close()
    self.best.close()

  def remove_if_empty(self) -> None:
    """Removes the checkpoint folders and the run directory if nothing was ever saved there."""
    self.close()
    if jax.process_index() == 0:
      for directory in (self.root / PERIODIC_DIR, self.root / BEST_DIR, self.root):
        if directory.is_dir() and not any(directory.iterdir()):
          directory.rmdir()

  def latest_step(self) -> int | None:
    return self.periodic.latest_step()

  def best_val_loss(self) -> float:
    """The validation loss the best checkpoint was saved with (inf when there is none)."""
    if not self.best.all_steps():
      return math.inf
    try:
      _, _, _, meta = restore(self.best, None, meta_only=True)
    except CheckpointError:
      return math.inf
    return meta["metrics"].get("val_loss", math.inf)

  def set_aside_newer_than(self, step: int) -> None:
    """Moves the periodic steps after `step` (those a resume could not read) to unreadable/.

    Left in place, the newest would still count as the latest step, and the resumed run would
    skip saving when it reaches that step again. Moved, they are kept for the user to inspect.
    """
    newer = [s for s in self.periodic.all_steps() if s > step]
    if not newer:
      return
    if jax.process_index() == 0:
      for newer_step in newer:
        source = self.root / PERIODIC_DIR / str(newer_step)
        target = self.root / UNREADABLE_DIR / f"{PERIODIC_DIR}-{newer_step}"
        suffix = 1
        while target.exists():  # an earlier resume may have set aside the same step
          target, suffix = target.with_name(f"{PERIODIC_DIR}-{newer_step}.{suffix}"), suffix + 1
        target.parent.mkdir(exist_ok=True)
        shutil.move(source, target)
        logging.warning("moved unreadable checkpoint %s to %s", source, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("nanogptoss_jax:set_aside_unreadable")
    self.periodic.reload()


def _first_local_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def short_error(error: Exception, limit: int = 200) -> str:
  """The first line of an error, cut short: TensorStore's messages run to dozens of lines."""
  first = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}"


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state, *,
                 meta_only: bool = False):
  """(state, data_state, meta) of one step (state and data None with meta_only); raises if
  any file of it is unreadable or differs from its checksum."""
  verify(pathlib.Path(manager.directory) / str(step))
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  if meta_only:
    return None, None, meta
  # A step saved in the other layer layout (steps from before scanned layers name none: loop)
  # is read in its own and converted, optimiser state too.
  frozen = abstract_state.frozen
  abstract_state = dataclasses.replace(abstract_state, frozen=None)
  wanted = layer_stack.tree_layout(abstract_state)
  saved = meta.get(LAYER_LAYOUT_KEY, layer_stack.LOOP)
  target = layer_stack.to_layout(abstract_state, saved)  # the same tree when in that layout
  legacy = meta.get(PARAM_NAMES_KEY, 1) < PARAM_NAMES
  if legacy:
    target = rename_keys(target, LEGACY_NAMES)
  # A leaf without a target sharding gets the saved one, which names the devices of the run
  # that wrote it (another mesh, other processes) and cannot be rebuilt on a different
  # topology; such leaves land on this process's first device instead.
  items = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract_keys_to_data(target),
                                     fallback_sharding=_first_local_device()),
      data=ocp.args.JsonRestore()))
  state = _data_to_keys(items["state"], target)
  if legacy:
    state = rename_keys(state, {new: old for old, new in LEGACY_NAMES.items()})
  state = layer_stack.to_layout(state, wanted) if wanted else state
  return dataclasses.replace(state, frozen=frozen), items["data"], meta


def rename_keys(tree, renames: dict):
  """`tree` (a state, optimiser state, abstract or not) with dict keys renamed at any depth."""
  def is_node(node):
    return isinstance(node, Mapping) and any(key in node for key in renames)

  def rename(node):
    if not isinstance(node, Mapping):
      return node
    raw = node.raw_mapping if isinstance(node, nnx.State) else node
    return type(node)({renames.get(key, key): rename(value) for key, value in raw.items()})

  return jax.tree.map(rename, tree, is_leaf=is_node)


def restore(manager: ocp.CheckpointManager, abstract_state, *, meta_only: bool = False):
  """(step, state, data_state, meta) from the newest readable step; older steps are fallbacks.

  A step that fails to restore (truncated or corrupted files) is reported and skipped, never
  deleted: the user may still want it.
  """
  failures = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return step, *restore_step(manager, step, abstract_state, meta_only=meta_only)
    except Exception as error:  # noqa: BLE001 - any failure means "this step is unusable"
      logging.warning("checkpoint step %d in %s is unreadable (%s); trying an older one",
                      step, manager.directory, short_error(error))
      failures.append(f"step {step}: {short_error(error)}")
  if failures:
    raise CheckpointError(f"no readable checkpoint in {manager.directory}; every step failed: "
                          + "; ".join(failures) + ". The files were left in place.")
  return None


def make_meta(cfg: RunConfig, tokenizer: Tokenizer, step: int, metrics: dict[str, Any],
              source: dict | None = None) -> dict:
  """The JSON half of a checkpoint; `source` describes `train.init_from` (path, content hash)."""
  layout = (layer_layout(cfg.model, cfg.execution) if isinstance(cfg.model, GptOssConfig)
            else layer_stack.LOOP)
  meta = {"config": config_to_dict(cfg), "tokenizer": tokenizer.to_dict(), "step": step,
          "metrics": metrics, LAYER_LAYOUT_KEY: layout, PARAM_NAMES_KEY: PARAM_NAMES}
  return meta | ({SOURCE_KEY: source} if source else {})


def read_meta(meta: dict) -> tuple[RunConfig, Tokenizer]:
  return config_from_dict(meta["config"]), Tokenizer.from_dict(meta["tokenizer"])


def carry_tokenizer_file(run_dir: pathlib.Path) -> None:
  """Puts the BPE file in the run directory (once), so reading the run needs nothing else."""
  if not (run_dir / TOKENIZER_DIR / BPE_FILE_NAME).is_file():
    write_bpe_file(run_dir / TOKENIZER_DIR)


def use_run_tokenizer_file(run_dir: pathlib.Path) -> None:
  """Reads the tokenizer from the BPE file the run directory carries, when it has one."""
  if (run_dir / TOKENIZER_DIR / BPE_FILE_NAME).is_file():
    use_bpe_file(run_dir / TOKENIZER_DIR)


def read_only_manager(directory: pathlib.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory.absolute(), item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(read_only=True))
