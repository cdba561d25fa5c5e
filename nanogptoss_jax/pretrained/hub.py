"""Published checkpoints by Hugging Face hub id: `openai/gpt-oss-20b` -> a local directory.

`owner/name` is the layout at the repository's root (Hugging Face's: what every gpt-oss
repository and our exports hold there); `owner/name/original` the one in that folder (OpenAI's,
in the gpt-oss repositories); `@revision` pins a branch, tag or commit. Only the files that
layout needs are fetched (a gpt-oss repository holds each layout, ~13 GB for 20b, plus a Metal
copy) into the standard Hugging Face cache, with huggingface_hub's progress bars. A dropped
connection resumes the file where it stopped; a rerun after a failure keeps every finished file.
With HF_HUB_OFFLINE=1 the cached files are used without asking the hub.
"""

import logging
import os
import re
import shlex
import sys

from nanogptoss_jax.pretrained.safetensors_io import CheckpointError
from nanogptoss_jax.pretrained.tokenizer import TOKENIZER_FILE

# owner/name, then any folders, then an optional @revision; hub names use [A-Za-z0-9_.-].
HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?P<folder>(?:/[\w.-]+)*)"
                    r"(?:@(?P<revision>[\w./-]+))?")
# What load_pretrained reads from a layout's folder (layout.py): the config, the weights with
# their index, and our tokenizer if an export left one. Nothing in a folder below it.
LAYOUT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", TOKENIZER_FILE)
CONFIG_FILE = "config.json"


class HubError(CheckpointError):
  """A hub id whose files could not be fetched (or found in the cache); the message says why."""


def is_hub_id(path: str) -> bool:
  """`owner/name[/folder][@revision]` that names nothing on the local disk."""
  text = str(path)
  return (HUB_ID.fullmatch(text) is not None and not text.startswith(".")
          and not os.path.exists(text))


def is_published(path: str) -> bool:
  """A published checkpoint (a hub id, or a directory with config.json at its top) rather than
  one of our run directories."""
  return is_hub_id(path) or os.path.isfile(os.path.join(path, CONFIG_FILE))


def patterns(folder: str) -> tuple[list[str], list[str]]:
  """(allow, ignore) glob patterns for the files of the layout in `folder` ("" for the root)."""
  prefix = f"{folder}/" if folder else ""
  # huggingface_hub's `*` crosses "/": without the ignore pattern, the root's *.safetensors
  # would also fetch original/model.safetensors, a second copy of the weights.
  return [prefix + name for name in LAYOUT_FILES], [prefix + "*/*"]


def resolve(path: str) -> str:
  """`path` itself if it is not a hub id; else the local directory holding its fetched layout."""
  if not is_hub_id(path):
    return path
  import huggingface_hub  # here: only a hub id needs it

  match = HUB_ID.fullmatch(str(path))
  repo, revision, folder = match["repo"], match["revision"], match["folder"].strip("/")
  allow, ignore = patterns(folder)
  requests_log = logging.getLogger("httpx2")  # one INFO line per request, hundreds per fetch
  if requests_log.level == logging.NOTSET:
    requests_log.setLevel(logging.WARNING)
  try:
    snapshot = huggingface_hub.snapshot_download(
        repo, revision=revision, allow_patterns=allow, ignore_patterns=ignore)
  except Exception as error:  # noqa: BLE001 - each kind becomes one line saying what to do
    raise HubError(_failure(path, repo, revision, allow, ignore, error)) from error
  local = os.path.join(snapshot, folder) if folder else snapshot
  if not os.path.isfile(os.path.join(local, CONFIG_FILE)):
    raise HubError(_no_config(path, repo, folder, snapshot))
  print(f"{path}: {local}", file=sys.stderr)
  return local


def download_command(repo: str, revision: str | None, allow: list[str], ignore: list[str]) -> str:
  """The `hf download` command that fetches what `resolve` does."""
  words = ["hf", "download", repo]
  words += [f"--revision={revision}"] if revision else []
  words += [f"--include={pattern}" for pattern in allow]
  words += [f"--exclude={pattern}" for pattern in ignore]
  return shlex.join(words)


def _failure(path, repo, revision, allow, ignore, error: Exception) -> str:
  from huggingface_hub import constants, errors

  fetch = download_command(repo, revision, allow, ignore)
  endpoint, cache = constants.ENDPOINT, constants.HF_HUB_CACHE
  lines = str(error).strip().splitlines()
  why = f"{type(error).__name__}: {lines[0] if lines else ''}"
  if isinstance(error, errors.GatedRepoError):
    return (f"{repo} is gated: accept its terms at {endpoint}/{repo}, then log in with "
            "`hf auth login`")
  if isinstance(error, errors.RepositoryNotFoundError):
    return (f"{path} is neither a local directory nor a model repository on {endpoint} "
            "(a private or gated one needs `hf auth login`)")
  if isinstance(error, errors.RevisionNotFoundError):
    return f"{repo} has no revision {revision!r} on {endpoint}"
  if isinstance(error, errors.LocalEntryNotFoundError):
    missing = ("lacks some of its files" if isinstance(error, errors.IncompleteSnapshotError)
               else "does not hold it")
    if constants.is_offline_mode():
      return (f"HF_HUB_OFFLINE is set and the Hugging Face cache ({cache}) {missing}: {path} "
              f"needs {', '.join(allow)}. Run once without HF_HUB_OFFLINE to fetch them, or "
              f"`{fetch}`, or pass a local directory")
    return (f"could not reach {endpoint} to fetch {path} ({why}) and the Hugging Face cache "
            f"({cache}) {missing}; check the network (or HF_ENDPOINT), fetch it elsewhere with "
            f"`{fetch}`, or pass a local directory")
  return (f"fetching {path} from {endpoint} failed ({why}); run the same command again: the "
          "files already fetched are kept")


def _no_config(path: str, repo: str, folder: str, snapshot: str) -> str:
  """Says where in the repository a layout is, when `folder` holds none."""
  from huggingface_hub import get_cached_repo_tree

  try:
    tree = get_cached_repo_tree(repo, revision=os.path.basename(snapshot))
    folders = sorted({os.path.dirname(f.path) for f in tree
                      if os.path.basename(f.path) == CONFIG_FILE})
  except Exception:  # noqa: BLE001 - only a hint; the error stands without it
    folders = []
  where = f"its folder {folder!r}" if folder else "its root"
  hint = (f"; try {', '.join('/'.join(filter(None, [repo, f])) for f in folders)}" if folders
          else "")
  return f"{repo} holds no {CONFIG_FILE} at {where}, so no checkpoint layout{hint}"
