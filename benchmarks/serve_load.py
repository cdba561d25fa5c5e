"""Load on the server: 1, 4 and 16 concurrent streaming clients; req/s, tok/s, p50/p99 TTFT.

python benchmarks/serve_load.py --checkpoint runs/nano [--requests-per-client 4] [--slots 16]
Starts the server in-process on a free loopback port; tokens are counted from `usage`.
"""

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.serving_helpers import serve  # noqa: E402  (a real uvicorn in a thread)

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside"


async def client(url, count, results):
  import openai
  async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as api:
    await _requests(api, count, results)


async def _requests(api, count, results):
  for _ in range(count):
    start, first, tokens = time.perf_counter(), None, 0
    stream = await api.completions.create(model="tiny", prompt=PROMPT, max_tokens=64,
                                          temperature=1.0, stream=True,
                                          stream_options={"include_usage": True})
    async for chunk in stream:
      if first is None and chunk.choices:
        first = time.perf_counter() - start
      if chunk.usage:
        tokens = chunk.usage.completion_tokens
    results.append((first or 0.0, time.perf_counter() - start, tokens))


async def level(url, clients, per_client):
  results = []
  start = time.perf_counter()
  await asyncio.gather(*(client(url, per_client, results) for _ in range(clients)))
  wall = time.perf_counter() - start
  ttft = np.array([r[0] for r in results])
  return (len(results) / wall, sum(r[2] for r in results) / wall, np.percentile(ttft, 50),
          np.percentile(ttft, 99), np.mean([r[1] for r in results]))


def main():
  parse = argparse.ArgumentParser(description=__doc__)
  parse.add_argument("--checkpoint", required=True)
  parse.add_argument("--requests-per-client", type=int, default=4)
  parse.add_argument("--slots", type=int, default=16)
  args = parse.parse_args()
  from nanogptoss_jax.serving.open_model import open_model
  model, tokenizer, plain = open_model(args.checkpoint, "plain")
  with serve(model, tokenizer, plain_text=plain, slots=args.slots) as (url, engine):
    start = time.perf_counter()
    engine.warm_up(len(tokenizer.encode(PROMPT)))  # what a long-running server compiles once
    print(f"warm-up (decode chunk, prefill of every batch bucket): "
          f"{time.perf_counter() - start:.1f} s")
    asyncio.run(levels(url, args.requests_per_client))


async def levels(url, per_client):
  # One unmeasured pass first (the engine has compiled everything by now; this warms the HTTP
  # stack and the allocator). The table is the steady state; the last column with 1 client is
  # the time of one full request alone.
  for clients in (1, 4, 16):
    await level(url, clients, per_client)
  print("clients  req/s   tok/s  p50 TTFT s  p99 TTFT s  mean request s")
  for clients in (1, 4, 16):
    rps, tps, p50, p99, mean = await level(url, clients, per_client)
    print(f"{clients:7d} {rps:6.2f} {tps:7.1f} {p50:11.3f} {p99:11.3f} {mean:15.3f}")


if __name__ == "__main__":
  main()
