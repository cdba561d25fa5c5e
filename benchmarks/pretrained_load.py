"""load_pretrained on a multi-GB synthetic checkpoint: GB/s and peak anonymous host memory.

TIKTOKEN_CACHE_DIR=../shared/tiktoken python benchmarks/pretrained_load.py [--layers 2]
Writes gpt-oss-20b's widths (201k vocab, 32 experts) with `--layers` blocks in OpenAI's original
layout (MXFP4 experts, bf16 rest) and, exported from it, Hugging Face's; then loads each in a
fresh process (float32 on the CPU, mxfp4=keep). Memory is the peak of RssAnon (sampled every
5 ms in a thread): VmHWM would count the checkpoint's memory-mapped file pages too, which the
kernel can drop, so it overstates what loading costs. The target is peak <= ~1.3 x (loaded
bytes + largest loaded tensor). Deletes the files afterwards unless --keep-files.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

CHILD = """
import json, sys, threading, time
def rss_anon():
  for line in open("/proc/self/status"):
    if line.startswith("RssAnon:"):
      return int(line.split()[1]) * 1024
peak, before = [0], rss_anon()
def sample():
  while True:
    peak[0] = max(peak[0], rss_anon()); time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
import jax, numpy as np
from nanogptoss_jax.pretrained.load import load_pretrained, model_bytes
from flax import nnx
jax.numpy.zeros(1).block_until_ready()  # the backend's own memory, before the clock starts
base = rss_anon()
start = time.perf_counter()
model = load_pretrained(sys.argv[1])[0]
jax.block_until_ready(nnx.state(model))
seconds = time.perf_counter() - start
time.sleep(0.05)
largest = max(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
print(json.dumps(dict(seconds=seconds, base=base, peak=peak[0], bytes=model_bytes(model),
                      largest=largest)))
"""


def write_original(path: str, layers: int) -> None:
  from nanogptoss_jax.model.config import GPT_OSS_20B
  from nanogptoss_jax.pretrained import safetensors_io
  from pretrained_helpers import reference_fields, reference_shapes
  cfg = GPT_OSS_20B.replace(num_hidden_layers=layers)
  rng = np.random.default_rng(0)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(reference_fields(cfg), f)
  tensors = {}
  for name, shape in reference_shapes(cfg).items():
    if name.endswith(("mlp1_weight", "mlp2_weight")):
      experts, out, inputs = shape
      tensors[f"{name}.blocks"] = rng.integers(0, 256, (experts, out, inputs // 32, 16), np.uint8)
      tensors[f"{name}.scales"] = rng.integers(118, 125, (experts, out, inputs // 32), np.uint8)
    else:  # bf16 bits of values in [0.0039, 0.0078): the values do not matter for loading
      tensors[name] = rng.integers(0x3B80, 0x3C00, shape, np.uint16).view(ml_dtypes.bfloat16)
  safetensors_io.write(os.path.join(path, "model.safetensors"), tensors)


def write_hugging_face(original: str, path: str) -> None:
  from nanogptoss_jax.pretrained.export import save_pretrained
  from nanogptoss_jax.pretrained.load import load_pretrained
  model, tokenizer = load_pretrained(original, dtype="bfloat16")
  save_pretrained(model, tokenizer, path, dtype="bfloat16")


def measure(path: str) -> dict:
  env = os.environ | {"JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", CHILD, path], cwd=REPO, env=env, check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--dir", default="/tmp/pretrained-load-bench")
  parser.add_argument("--keep-files", action="store_true")
  args = parser.parse_args()
  original, hf = os.path.join(args.dir, "original"), os.path.join(args.dir, "hf")
  try:
    start = time.perf_counter()
    write_original(original, args.layers)
    write_hugging_face(original, hf)
    print(f"wrote both layouts in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for name, path in (("original", original), ("hugging-face", hf)):
      disk = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e9
      r = measure(path)
      extra = r["peak"] - r["base"]
      bound = r["bytes"] + r["largest"]
      print(f"{name:13s} file {disk:.2f} GB  loaded {r['bytes'] / 1e9:.2f} GB in "
            f"{r['seconds']:.1f} s = {r['bytes'] / 1e9 / r['seconds']:.2f} GB/s  peak RssAnon "
            f"+{extra / 1e9:.2f} GB = {extra / bound:.2f} x (loaded + largest "
            f"{r['largest'] / 1e9:.2f} GB)")
  finally:
    if not args.keep_files:
      shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
  main()
