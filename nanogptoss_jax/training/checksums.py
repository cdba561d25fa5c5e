"""The SHA-256 of every file of a finished checkpoint step, checked before a step is trusted:
TensorStore reads a flipped byte of the array data without complaint."""

import hashlib
import json
import pathlib

from nanogptoss_jax.errors import UserError

CHECKSUMS_FILE = "checksums.json"  # in each step directory


class CorruptCheckpointError(UserError, RuntimeError):
  """A file of a checkpoint step changed, vanished or was cut short after it was written."""


def _step_files(step_dir: pathlib.Path) -> dict[str, str]:
  return {str(path.relative_to(step_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(step_dir.rglob("*")) if path.is_file() and path.name != CHECKSUMS_FILE}


def seal(step_dir: pathlib.Path) -> None:
  """Records the checksums of a step whose write has finished."""
  if step_dir.is_dir() and not (step_dir / CHECKSUMS_FILE).exists():
    temporary = step_dir / (CHECKSUMS_FILE + ".tmp")
    temporary.write_text(json.dumps(_step_files(step_dir), indent=0))
    temporary.replace(step_dir / CHECKSUMS_FILE)


def verify(step_dir: pathlib.Path) -> None:
  """Raises CorruptCheckpointError if a file of a sealed step changed, vanished or was cut short."""
  if not (step_dir / CHECKSUMS_FILE).is_file():
    return  # killed between its write and its seal (or written by an older version)
  expected = json.loads((step_dir / CHECKSUMS_FILE).read_text())
  actual = _step_files(step_dir)
  damaged = sorted(name for name in expected if actual.get(name) != expected[name])
  if damaged:
    missing = [name for name in damaged if name not in actual]
    raise CorruptCheckpointError(f"{len(damaged)} file(s) of {step_dir} differ from their checksums "
                          f"({len(missing)} missing): {', '.join(damaged[:3])}")
