"""Experiments built on training and sampling: the GPT-OSS vs GPT-2 comparison, and timing."""
