"""Weights to and from other implementations: OpenAI's torch reference."""
