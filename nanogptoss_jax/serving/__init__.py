"""Serving: a continuous-batching engine, an OpenAI-compatible HTTP API and a chat page."""
