"""A run's evaluation: the loss over its fixed validation batches, and the sample it logs."""

import math

import jax

from nanogptoss_jax.chat import harmony
from nanogptoss_jax.sampling.decode import generate
from nanogptoss_jax.sampling.text import generate_text
from nanogptoss_jax.training import faults
from nanogptoss_jax.training import mesh as sharding
from nanogptoss_jax.training.run_config import RunConfig
from nanogptoss_jax.training.run_data import RunData

SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 50


def evaluate(eval_step, state, data: RunData, eval_sharding, step: int) -> dict:
  """val_loss: the weighted mean token loss over every validation batch (for chats, over the
  held-out assistant tokens); val_bpb, bits per byte, for text."""
  total, counted = 0.0, 0.0
  for rows in data.val_batches:
    batch = jax.tree.map(lambda r: sharding.global_batch(r, eval_sharding), rows)
    loss_sum, weight_sum = eval_step(state.params, state.frozen, state.rest, batch)
    total, counted = total + float(loss_sum), counted + float(weight_sum)
    faults.maybe_kill("mid_eval", step)
  result = {"val_loss": total / counted}
  if data.bytes_per_token is not None:
    result["val_bpb"] = result["val_loss"] / math.log(2) / data.bytes_per_token
  return result


def sample(model, tokenizer, cfg: RunConfig, step: int) -> str:
  """A continuation of train.sample_prompt; a chat run answers it as a user's message, and the
  sample shows the harmony tokens it wrote (channels and all) up to its stop token."""
  train = cfg.train
  options = dict(temperature=SAMPLE_TEMPERATURE, top_k=SAMPLE_TOP_K, seed=step)
  if not cfg.data.is_chat:
    return generate_text(model, tokenizer, train.sample_prompt, train.sample_tokens, **options)
  prompt = harmony.render_chat([{"role": "user", "content": train.sample_prompt}],
                               tokenizer=tokenizer)
  new = generate(model, [prompt], train.sample_tokens, stop_tokens=harmony.stop_ids(tokenizer),
                 **options)[0]
  return tokenizer.decode(new)
