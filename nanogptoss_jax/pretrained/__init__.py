"""Published GPT-OSS checkpoints in and out: OpenAI's original layout and Hugging Face's."""
