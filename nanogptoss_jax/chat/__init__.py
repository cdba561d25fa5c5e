"""Chat formats: OpenAI's harmony (render a conversation to ids, parse generated ids back)."""
