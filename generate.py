"""Sample from a trained checkpoint, streaming text to the terminal.

    python generate.py --checkpoint runs/nano --prompt "Once upon a time" \
        --max-new-tokens 200 --temperature 0.8 --top-k 50
"""

if __name__ == "__main__":  # first, before the heavy imports: it may restart the process
  from nanogptoss_jax.cpu_malloc import reexec_with_malloc_tunables
  reexec_with_malloc_tunables()

import argparse
import logging

from nanogptoss_jax.checkpoint import load_checkpoint
from nanogptoss_jax.sampling import generate_text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--checkpoint", required=True, help="a run directory written by train.py")
  parser.add_argument("--prompt", default="Once upon a time")
  parser.add_argument("--max-new-tokens", type=int, default=200)
  parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
  parser.add_argument("--top-k", type=int, default=None)
  parser.add_argument("--top-p", type=float, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-samples", type=int, default=1, help="samples drawn one after another")
  args = parser.parse_args()
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only directories
  model, tokenizer = load_checkpoint(args.checkpoint)
  for index in range(args.num_samples):
    print(args.prompt, end="", flush=True)
    generate_text(model, tokenizer, args.prompt, args.max_new_tokens, stream=True,
                  temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                  seed=args.seed + index)
    print("\n" + "-" * 40 if index + 1 < args.num_samples else "")


if __name__ == "__main__":
  main()
