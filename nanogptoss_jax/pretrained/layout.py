"""Which published layout a directory holds, and which file holds each tensor.

OpenAI's original layout: `config.json` with the reference `ModelConfig` fields and any
`*.safetensors`. Hugging Face's: `config.json` with `model_type: gpt_oss`, one
`model.safetensors` or shards listed by `model.safetensors.index.json`.
"""

import dataclasses
import json
import os

from nanogptoss_jax.pretrained.safetensors_io import CheckpointError, SafetensorsFile

ORIGINAL, HUGGING_FACE = "original", "hugging_face"
INDEX_FILE = "model.safetensors.index.json"
HF_MODEL_TYPE = "gpt_oss"


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint directory: its layout, raw config.json, and tensor name -> open file."""

  path: str
  layout: str
  config: dict
  files: dict[str, SafetensorsFile]

  def has(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str):
    if name not in self.files:
      raise CheckpointError(f"{self.path} has no tensor {name}")
    return self.files[name].get(name)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[name].shape(name)

  def nbytes(self) -> int:
    return sum(f.get(n).nbytes for n, f in self.files.items())


def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} does not exist: a checkpoint directory needs it")
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def open_checkpoint(path: str) -> Checkpoint:
  """Opens `path` (a directory, or an `original/` inside one) without reading tensors."""
  if not os.path.isdir(path):
    raise CheckpointError(f"checkpoint directory {path} does not exist")
  config = read_json(os.path.join(path, "config.json"))
  layout = HUGGING_FACE if config.get("model_type") == HF_MODEL_TYPE else ORIGINAL
  index = os.path.join(path, INDEX_FILE)
  if layout == HUGGING_FACE and os.path.isfile(index):
    weight_map = read_json(index).get("weight_map", {})
    shards = sorted(set(weight_map.values()))
  else:
    shards = sorted(name for name in os.listdir(path) if name.endswith(".safetensors"))
    weight_map = None
  if not shards:
    raise CheckpointError(f"{path} holds no *.safetensors files")
  files = {}
  for shard in shards:
    opened = SafetensorsFile(os.path.join(path, shard))
    for name in opened.names():
      files[name] = opened
  if weight_map is not None:
    missing = sorted(n for n, shard in weight_map.items() if n not in files)
    if missing:
      raise CheckpointError(f"{INDEX_FILE} lists {len(missing)} tensors its shards lack, "
                            f"e.g. {missing[0]}")
  return Checkpoint(path, layout, config, files)
