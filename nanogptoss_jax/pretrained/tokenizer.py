"""The tokenizer a published checkpoint speaks, and ours saved beside an export."""

import json
import os

from nanogptoss_jax.data.tokenizer import FullTokenizer, Tokenizer
from nanogptoss_jax.o200k import CALL, RETURN, SPECIAL_IDS

TOKENIZER_FILE = "nanogptoss_tokenizer.json"  # our Tokenizer.to_dict(), written by an export
# gpt-oss ends a harmony turn with <|return|> (the answer) or <|call|> (a tool call).
HARMONY_STOP_IDS = (SPECIAL_IDS[RETURN], SPECIAL_IDS[CALL])


class HarmonyTokenizer(FullTokenizer):
  """o200k_harmony with gpt-oss's stop ids (200002, 200012)."""

  def __init__(self):
    super().__init__()
    self.stop_ids = HARMONY_STOP_IDS


def tokenizer_for(path: str) -> Tokenizer:
  """Our saved tokenizer if an export left one in `path`, else gpt-oss's."""
  file = os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(file):
    return HarmonyTokenizer()
  with open(file) as f:
    return Tokenizer.from_dict(json.load(f))


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
  with open(os.path.join(path, TOKENIZER_FILE), "w") as f:
    json.dump(tokenizer.to_dict(), f)
