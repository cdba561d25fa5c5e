"""Text in, text out: `generate_text`, with streaming that never splits a multi-byte character."""

import sys
from collections.abc import Callable

from nanogptoss_jax.sampling.decode import generate


class _TextStream:
  """Turns a growing id list into text pieces without splitting a multi-byte character."""

  def __init__(self, tokenizer, emit: Callable[[str], None]):
    self.tokenizer, self.emit = tokenizer, emit
    self.ids, self.shown = [], ""

  def add(self, tokens: list[int | None]) -> None:
    if tokens[0] is not None:
      self.ids.append(tokens[0])
      self._show(final=False)

  def _show(self, final: bool) -> None:
    # Decoding the whole list each time keeps shown text exact; a trailing U+FFFD may be a
    # character whose remaining bytes are still to come, so it waits unless this is the end.
    text = self.tokenizer.decode(self.ids)
    if not final:
      text = text.rstrip("\ufffd")
    if len(text) > len(self.shown) and text.startswith(self.shown):
      self.emit(text[len(self.shown):])
      self.shown = text

  def finish(self) -> None:
    self._show(final=True)


def _print_piece(piece: str) -> None:
  sys.stdout.write(piece)
  sys.stdout.flush()


def generate_text(model, tokenizer, prompts: list[str] | str, max_new_tokens: int, *,
                  stream: bool | Callable[[str], None] = False, **kwargs) -> list[str] | str:
  """Text continuations of text prompts (a str gives a str); kwargs go to generate().

  stop_tokens defaults to tokenizer.stop_ids. stream=True prints a single prompt's text to
  stdout as it is drawn; a callable stream receives the text pieces instead.
  """
  single = isinstance(prompts, str)
  texts = [prompts] if single else list(prompts)
  kwargs.setdefault("stop_tokens", tokenizer.stop_ids)
  text_stream = None
  if stream:
    if len(texts) != 1:
      raise ValueError(f"stream needs a single prompt, got {len(texts)}")
    text_stream = _TextStream(tokenizer, _print_piece if stream is True else stream)
    kwargs["callback"] = text_stream.add
  new_tokens = generate(model, [tokenizer.encode(text) for text in texts], max_new_tokens,
                        **kwargs)
  if text_stream is not None:
    text_stream.finish()
  outputs = [tokenizer.decode(tokens) for tokens in new_tokens]
  return outputs[0] if single else outputs
