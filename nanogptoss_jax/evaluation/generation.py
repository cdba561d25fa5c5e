"""Batched generation through our sampler that ends at stop strings as well as stop ids."""

from nanogptoss_jax.sampling.decode import generate

# A stop string of n characters spans at most this many tokens per character (a character is
# at most 4 UTF-8 bytes and every token holds at least one byte), plus one for an unfinished one.
TOKENS_PER_CHARACTER = 4


class _AllStopped(Exception):
  """Every row's text holds a stop string: the sampler need not draw more."""


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
  """text up to (not including) the earliest occurrence of any stop string."""
  ends = [text.find(stop) for stop in stop_strings if stop and stop in text]
  return text[:min(ends)] if ends else text


def generate_until(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, *,
                   stop_strings: list[str], stop_tokens: tuple[int, ...], batch_rows: int,
                   **sampler) -> list[str]:
  """The text each prompt continues with, up to its first stop string or stop id.

  Rows are padded to `batch_rows` (copies of the last prompt) so every batch has one shape; the
  sampler streams each step's tokens and is ended once every row's text holds a stop string.
  `sampler`: temperature, top_k, top_p, seed as `sampling.decode.generate` takes them.
  """
  if not 0 < len(prompts) <= batch_rows:
    raise ValueError(f"expected 1 to {batch_rows} prompts, got {len(prompts)}")
  rows = prompts + [prompts[-1]] * (batch_rows - len(prompts))
  drawn = [[] for _ in prompts]
  finished = [False] * len(prompts)
  stop_strings = [stop for stop in stop_strings if stop]
  tail = TOKENS_PER_CHARACTER * max((len(stop) for stop in stop_strings), default=0) + 1

  def on_step(tokens: list[int | None]) -> None:
    for row, token in enumerate(tokens[:len(prompts)]):
      if finished[row]:
        continue
      if token is None:  # the row drew a stop id
        finished[row] = True
        continue
      drawn[row].append(token)
      # Only the newest tokens can complete a stop string the older ones did not hold.
      finished[row] = any(stop in tokenizer.decode(drawn[row][-tail:]) for stop in stop_strings)
    if all(finished):
      raise _AllStopped

  if not stop_strings:  # the sampler's own loop, with no host round trips between steps
    drawn = generate(model, rows, max_new_tokens, stop_tokens=stop_tokens, **sampler)
    return [tokenizer.decode(tokens) for tokens in drawn[:len(prompts)]]
  try:
    generate(model, rows, max_new_tokens, stop_tokens=stop_tokens, callback=on_step, **sampler)
  except _AllStopped:
    pass
  return [cut_at_stop(tokenizer.decode(tokens), stop_strings) for tokens in drawn]
