"""What a resume may change: where things are and how to optimise, not what is trained on what."""

import json
import os
import pathlib

from nanogptoss_jax.model.config import ConfigError
from nanogptoss_jax.training.config_io import config_from_dict, config_to_dict
from nanogptoss_jax.training.run_config import RunConfig


# Settings a resume must keep: `data` and `model` shape the stream and the state, and these
# train settings fix where the saved data position points (it counts batches of one size, over
# windows cut at one length, in one seed's shuffle order). The optimizer and the step count may
# change (e.g. a lower learning rate after a divergence).
RESUME_TRAIN_KEYS = ("seed", "batch_size", "context_len")


# Data fields that say where things are, not what the data is: a resume may change them.
DATA_LOCATION_KEYS = ("cache_dir", "tokenizer_path")


def _data_identity(data: dict) -> dict:
  """The data section as what it is: a local path by where it resolves to, not its spelling."""
  identity = {key: value for key, value in data.items() if key not in DATA_LOCATION_KEYS}
  for section in (identity, identity.get("chat", {})):
    if section.get("path") and os.path.exists(section["path"]):
      section["path"] = os.path.realpath(section["path"])
  return identity


def check_resumable(cfg: RunConfig, saved: dict, run_dir: pathlib.Path) -> None:
  """Raises unless `cfg` may resume the run saved with config `saved` (a dict, as saved).

  The execution config may change (dtypes, kernels, layouts, mesh), except the experts' storage
  format, which decides what the parameters are."""
  current = json.loads(json.dumps(config_to_dict(cfg)))  # as saved: tuples become lists
  saved = json.loads(json.dumps(config_to_dict(config_from_dict(saved))))  # older layouts too
  pairs = [("model", saved["model"], current["model"]),
           ("data", _data_identity(saved["data"]), _data_identity(current["data"])),
           ("execution", {"expert_format": saved["execution"]["expert_format"]},
            {"expert_format": current["execution"]["expert_format"]})]
  pairs.append(("train", {key: saved["train"][key] for key in RESUME_TRAIN_KEYS},
                {key: current["train"][key] for key in RESUME_TRAIN_KEYS}))
  for section, before, now in pairs:
    if before != now:
      raise ConfigError(
          f"{run_dir} holds a run with a different {section} config, so it cannot be resumed "
          f"with this one.\n  saved:   {before}\n  current: {now}\n"
          f"Use another --config.run_dir, or move that directory away (nothing was deleted).")
