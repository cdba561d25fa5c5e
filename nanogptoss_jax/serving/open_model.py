"""Opens what the chat and serve commands talk to: one of our run directories or a pretrained one."""

import logging
import pathlib

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.pretrained import hub


def open_model(path: str, chat_format: str = "auto"):
  """(model, tokenizer, plain_text): our run directory via load_checkpoint, else load_pretrained.

  `chat_format` auto: harmony for pretrained gpt-oss directories and for our runs fine-tuned on
  chat data (data.chat); plain text for our runs trained on raw text (they never learned
  harmony) and for tokenizers without its tokens.
  """
  root = pathlib.Path(path)
  if not root.is_dir() and not hub.is_hub_id(path):
    raise UserError(f"no checkpoint directory {root}; pass a run directory written by train.py, "
                    "a pretrained gpt-oss directory or a hub id (openai/gpt-oss-20b)")
  ours = (root / "best").is_dir() or (root / "checkpoints").is_dir()
  learned_harmony = not ours
  if ours:
    from nanogptoss_jax.training.weights import load_checkpoint, run_description
    model, tokenizer = load_checkpoint(root)
    learned_harmony = run_description(root)[0].data.is_chat
  else:
    try:
      from nanogptoss_jax.pretrained.load import load_pretrained
    except ImportError as missing:
      raise UserError(f"{root} is not one of our run directories, and pretrained loading is "
                      f"unavailable here ({missing})") from None
    model, tokenizer = load_pretrained(str(root))
  can_harmony = harmony.supports_harmony(tokenizer)
  if chat_format == "harmony" and not can_harmony:
    raise UserError(f"{root}'s tokenizer lacks harmony's special tokens; use --chat-format plain")
  plain = chat_format == "plain" or not can_harmony or (chat_format == "auto"
                                                        and not learned_harmony)
  logging.info("chat format: %s", "harmony" if not plain else
               "plain text (the model never learned harmony)" if not learned_harmony else
               "plain text")
  return model, tokenizer, plain
