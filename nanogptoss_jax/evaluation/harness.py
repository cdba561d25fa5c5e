"""lm-evaluation-harness's `LM` interface over our models (`lm_eval.api.model.TemplateLM`).

loglikelihood and loglikelihood_rolling become token rows scored in jitted batches
(evaluation/scoring.py); generate_until runs our sampler and ends at the task's stop strings.
"""

import json
import logging

from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from nanogptoss_jax.evaluation.generation import generate_until
from nanogptoss_jax.evaluation.loading import Adapter, load_model
from nanogptoss_jax.evaluation.scoring import Row, score_rows
from nanogptoss_jax.progress import progress_bar

# Longest row scored when the model allows more (gpt-oss: 131,072 positions); --max-length.
DEFAULT_MAX_LENGTH = 8192
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for a generation task
DEFAULT_BATCH_TOKENS = 16384  # padded tokens per scoring batch
DEFAULT_GENERATION_BATCH = 16  # prompts sampled together
# gen_kwargs we honour; lm-eval's are HF generate()'s names.
SAMPLER_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p", "seed")


class HarnessModel(TemplateLM):
  """A checkpoint (run directory, published directory or hub id; `adapter` maps the loaded model)
  or a (model, tokenizer) pair, as lm-eval's `LM`. Greedy unless a task asks to sample."""

  def __init__(self, checkpoint: str | None = None, *, model=None, tokenizer=None,
               adapter: Adapter | None = None, max_length: int | None = None,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               batch_tokens: int = DEFAULT_BATCH_TOKENS,
               generation_batch: int = DEFAULT_GENERATION_BATCH, seed: int = 0):
    super().__init__()
    if (checkpoint is None) == (model is None):
      raise ValueError("pass a checkpoint path or a model (with its tokenizer), not both")
    if checkpoint is not None:
      model, tokenizer = load_model(checkpoint, adapter=adapter)
    elif adapter is not None:
      model = adapter(model)
    self.model, self.tokenizer = model, tokenizer
    self.name = checkpoint or type(model).__name__
    limit = model.cfg.max_positions
    self._max_length = min(limit, max_length or DEFAULT_MAX_LENGTH)
    self.max_gen_toks, self.batch_tokens = max_gen_toks, batch_tokens
    self.generation_batch, self.seed = generation_batch, seed
    vocab = model.cfg.vocab_size
    self.stop_tokens = tuple(dict.fromkeys(t for t in (*tokenizer.stop_ids, tokenizer.eot_id)
                                           if t < vocab))

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eot_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def tokenizer_name(self) -> str:
    return f"nanogptoss-{self.tokenizer.vocab_size}"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    return self.tokenizer.encode(string)

  def tok_decode(self, tokens) -> str:
    return self.tokenizer.decode(tokens)

  def _score(self, rows: list[Row], description: str, disable_tqdm: bool):
    with progress_bar(total=len(rows), desc=description, disable=disable_tqdm) as bar:
      return score_rows(self.model, rows, batch_tokens=self.batch_tokens, progress=bar.update)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    """((context, continuation), context ids, continuation ids) -> (log p, is greedy)."""
    rows = []
    for _, context, continuation in requests:
      # Left-truncated to the model's length, as lm-eval's own models do.
      whole = (context + continuation)[-(self.max_length + 1):]
      rows.append(Row(tuple(whole), min(len(continuation), len(whole) - 1)))
    scored = [row for row in rows if row.scored > 0]
    answers = iter(self._score(scored, "loglikelihood", disable_tqdm))
    results = [next(answers) if row.scored > 0 else (0.0, True) for row in rows]
    for (pair, _, _), result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", pair, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Each string's log-likelihood in disjoint windows of max_length, the first after EOT."""
    rows, owners = [], []
    for index, (string,) in enumerate(request.args for request in requests):
      windows = get_rolling_token_windows(token_list=self.tok_encode(string),
                                          prefix_token=self.prefix_token_id,
                                          max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(make_disjoint_window, windows):
        rows.append(Row(tuple(context + continuation), len(continuation)))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._score(rows, "loglikelihood_rolling",
                                                         disable_tqdm)):
      totals[owner] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, if the task says do_sample) text up to the task's stop strings."""
    groups = {}  # requests sharing gen_kwargs sample together
    for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
      groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(
          (index, context))
    results = [""] * len(requests)
    with progress_bar(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
      for key, members in groups.items():
        max_new, stop_strings, sampler = self._sampler(json.loads(key))
        prompts = [(index, self._prompt(context, max_new)) for index, context in members]
        prompts.sort(key=lambda item: -len(item[1]))  # similar lengths share a batch
        for start in range(0, len(prompts), self.generation_batch):
          batch = prompts[start:start + self.generation_batch]
          texts = generate_until(self.model, self.tokenizer, [p for _, p in batch], max_new,
                                 stop_strings=stop_strings, stop_tokens=self.stop_tokens,
                                 batch_rows=_batch_rows(len(batch)), **sampler)
          for (index, _), text in zip(batch, texts):
            results[index] = text
            self.cache_hook.add_partial("generate_until", requests[index].args, text)
          bar.update(len(batch))
    return results

  def _prompt(self, context: str, max_new: int) -> list[int]:
    """The context's ids, left-truncated so the answer fits in max_length (EOT if empty)."""
    ids = self.tok_encode(context) or [self.prefix_token_id]
    return ids[-max(self.max_length - max_new, 1):]

  def _sampler(self, gen_kwargs: dict) -> tuple[int, list[str], dict]:
    """(max new tokens, stop strings, sampler settings) from a task's gen_kwargs."""
    unknown = sorted(set(gen_kwargs) - set(SAMPLER_KWARGS))
    if unknown:
      logging.warning("generate_until ignores gen_kwargs %s", unknown)
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
    if not gen_kwargs.get("do_sample", False):
      temperature = 0.0  # HF generate()'s meaning: no sampling is greedy, whatever temperature
    sampler = {"temperature": temperature, "seed": int(gen_kwargs.get("seed", self.seed))}
    if temperature > 0:
      sampler |= {"top_k": gen_kwargs.get("top_k"), "top_p": gen_kwargs.get("top_p")}
    return max_new, until, sampler


def _batch_rows(prompts: int) -> int:
  """Rows a generation batch is padded to: a power of two, so few shapes compile."""
  return 1 << max(prompts - 1, 0).bit_length()
