"""Text to training batches: the tokenizer, text sources, the token cache, streams and windows."""
