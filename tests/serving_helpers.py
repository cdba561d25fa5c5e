"""A real uvicorn server over a tiny random GPT-OSS, on a free loopback port, in a thread."""

import contextlib
import socket
import threading
import time

import uvicorn
from flax import nnx

from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.gptoss import GptOss
from nanogptoss_jax.serving.app import Service
from nanogptoss_jax.serving.engine import Engine
from nanogptoss_jax.serving.routes import create_app


def tiny_model(vocab_size: int) -> GptOss:
  cfg = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2,
                     vocab_size=vocab_size, hidden_size=32, intermediate_size=32, head_dim=8,
                     num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                     rope_scaling_factor=1.0, initial_context_length=512)
  return GptOss(cfg, rngs=nnx.Rngs(0))


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


@contextlib.contextmanager
def serve(model, tokenizer, *, plain_text=False, api_key=None, slots=4, max_queue=64):
  """Yields (base_url, engine) while uvicorn serves the app; stops both afterwards."""
  engine = Engine(model, slots=slots, cache_length=512, max_queue=max_queue)
  service = Service(engine, tokenizer, model_name="tiny", plain_text=plain_text)
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=api_key), host="127.0.0.1",
                                         port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started:
    assert time.time() < deadline, "uvicorn did not start"
    time.sleep(0.05)
  try:
    yield f"http://127.0.0.1:{port}", engine
  finally:
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
