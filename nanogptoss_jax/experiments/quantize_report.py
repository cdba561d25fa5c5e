"""What MXFP4 experts cost a model we trained: validation loss and bits per byte before and after
`ng.quantize(model, experts="mxfp4")`, and the bytes the expert matrices take in each form; and
what int8 embedding and attention kernels cost (`ng.quantize(model, experts=None, dense="int8")`,
the fine-tuning option of model/int8.py), alone and with MXFP4 experts.

  python -m nanogptoss_jax.experiments.quantize_report --checkpoint RUN [--checkpoint RUN ...]
      --data DIR --out DIR [--split validation] [--windows 200] [--context-len 256]

Each model is scored on the fixed windows that training's validation uses (the same split, length
and count, the count rounded down to whole batches as training's evaluation does, give the run's
last `val_loss`), once as trained and once with its experts quantized; everything else
(attention, router, embeddings, expert biases) keeps its float weights, as in the published
gpt-oss checkpoints.
"""

import argparse
import json
import logging
from pathlib import Path

from nanogptoss_jax.data.config import DataConfig
from nanogptoss_jax.evaluation.loading import load_model
from nanogptoss_jax.evaluation.text import score_text, text_windows
from nanogptoss_jax.experiments.compare_report import write_json
from nanogptoss_jax.model.params import count_bytes
from nanogptoss_jax.model.quantize import expert_bytes, quantize

TABLE_FILE, RESULTS_FILE = "quantize.md", "quantize.json"


def measure(checkpoint: str, data: DataConfig, args) -> dict:
  model, tokenizer = load_model(checkpoint)
  windows, weights, bytes_per_token = text_windows(tokenizer, data, args.split, args.context_len,
                                                   args.windows)
  whole = len(windows) // args.batch_size * args.batch_size  # training evaluates whole batches
  windows, weights = windows[:whole], weights[:whole]
  quantized = quantize(model, experts="mxfp4")
  variants = {"float": model, "mxfp4": quantized,
              "int8": quantize(model, experts=None, dense="int8"),
              "mxfp4_int8": quantize(quantized, experts=None, dense="int8")}
  scores = {name: score_text(m, windows, weights, bytes_per_token, batch_size=args.batch_size)
            for name, m in variants.items()}
  return {"checkpoint": checkpoint, "layers": model.cfg.num_hidden_layers,
          "hidden": model.cfg.hidden_size, "experts": model.cfg.num_experts, **scores,
          "expert_bytes_float": expert_bytes(model), "expert_bytes_mxfp4": expert_bytes(quantized),
          "model_bytes": {name: count_bytes(m) for name, m in variants.items()}}


def table(rows: list[dict]) -> str:
  lines = ["| model | val loss, float | val loss, MXFP4 | Δ loss | bits/byte, float → MXFP4 "
           "| expert bytes, float → MXFP4 |", "|---|---:|---:|---:|---:|---:|"]
  for row in rows:
    f, q = row["float"], row["mxfp4"]
    ratio = row["expert_bytes_float"] / row["expert_bytes_mxfp4"]
    lines.append(
        f"| `{row['checkpoint']}` ({row['layers']} layers, width {row['hidden']}, "
        f"{row['experts']} experts) | {f['loss']:.4f} | {q['loss']:.4f} | "
        f"{q['loss'] - f['loss']:+.4f} ({100 * (q['loss'] / f['loss'] - 1):+.2f}%) | "
        f"{f['bits_per_byte']:.4f} → {q['bits_per_byte']:.4f} | "
        f"{row['expert_bytes_float'] / 2**20:.2f} MiB → {row['expert_bytes_mxfp4'] / 2**20:.2f} "
        f"MiB ({ratio:.2f}x smaller) |")
  lines += ["", "| model | val loss, float | int8 embedding + attention | Δ loss | MXFP4 experts "
            "+ int8 | Δ loss | bytes, float → MXFP4 → MXFP4 + int8 |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for row in rows:
    if "int8" not in row:  # a report written before the int8 rows
      continue
    f, d, b, size = row["float"], row["int8"], row["mxfp4_int8"], row["model_bytes"]
    delta = lambda q: f"{q['loss'] - f['loss']:+.4f} ({100 * (q['loss'] / f['loss'] - 1):+.2f}%)"
    lines.append(
        f"| `{row['checkpoint']}` | {f['loss']:.4f} | {d['loss']:.4f} | {delta(d)} | "
        f"{b['loss']:.4f} | {delta(b)} | {size['float'] / 2**20:.1f} → "
        f"{size['mxfp4'] / 2**20:.1f} → {size['mxfp4_int8'] / 2**20:.1f} MiB |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--checkpoint", action="append", required=True,
                      help="a run directory (repeat for several)")
  parser.add_argument("--data", required=True, help="text dataset (hub id or local directory)")
  parser.add_argument("--out", required=True, help="where quantize.md and quantize.json go")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--windows", type=int, default=200)
  parser.add_argument("--context-len", type=int, default=256)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--cache-dir", default=".cache/nanogptoss")
  args = parser.parse_args(argv)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's notes on read-only directories
  data = DataConfig(path=args.data, cache_dir=args.cache_dir)
  rows = [measure(checkpoint, data, args) for checkpoint in args.checkpoint]
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  text = table(rows)
  (out / TABLE_FILE).write_text(text + "\n")
  write_json(out / RESULTS_FILE, {"args": vars(args), "rows": rows})
  print(text)
  print(json.dumps(rows, indent=2))


if __name__ == "__main__":
  main()
