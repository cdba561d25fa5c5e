"""Safetensors files read memory-mapped, one tensor at a time, and written; numpy only.

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the bytes. Reading through `np.memmap` keeps the checkpoint in
file pages (the kernel drops them under pressure) rather than in the process's own memory.
"""

import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from nanogptoss_jax.errors import UserError

DTYPES = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
          "U8": np.uint8, "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64,
          "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
HEADER_LIMIT = 100_000_000  # bytes; a larger header means the file is not safetensors
ALIGN = 8


class CheckpointError(UserError):
  """A checkpoint file is missing, damaged, or does not fit the model; the message says which."""


class SafetensorsFile:
  """The tensors of one file: `names()`, `shape(name)`, `get(name)` (a read-only memmap view)."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.isfile(path):
      raise CheckpointError(f"checkpoint file {path} does not exist")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
      if length is None or length > min(size - 8, HEADER_LIMIT):
        raise CheckpointError(f"{path} is not a safetensors file (or is truncated): its header "
                              f"does not fit in its {size} bytes")
      try:
        header = json.loads(f.read(length))
      except ValueError as e:
        raise CheckpointError(f"{path} has a damaged safetensors header ({e})") from None
    header.pop("__metadata__", None)
    self.start = 8 + length
    self.header = header
    for name, entry in header.items():
      if entry["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has dtype {entry['dtype']}, which we "
                              f"cannot read")
      end = entry["data_offsets"][1]
      if self.start + end > size:
        raise CheckpointError(f"{path} is truncated: tensor {name} needs bytes up to "
                              f"{self.start + end}, the file has {size}; download it again")
    self._map = None

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    entry = self.header[name]
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    begin, end = entry["data_offsets"]
    raw = self._map[self.start + begin:self.start + end]
    return raw.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  """Writes tensors (numpy, any dtype in DTYPES) as one safetensors file, in the given order."""
  header, offset = {}, 0
  for name, array in tensors.items():
    nbytes = math.prod(array.shape) * np.dtype(array.dtype).itemsize
    header[name] = {"dtype": NAMES[np.dtype(array.dtype)], "shape": list(array.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  if metadata:
    header["__metadata__"] = metadata
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % ALIGN)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in tensors.values():
      f.write(np.ascontiguousarray(array).tobytes())
