"""Scoring checkpoints: lm-evaluation-harness tasks, and loss / bits per byte on a text dataset."""
