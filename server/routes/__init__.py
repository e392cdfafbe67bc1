"""Route groups of the OpenAI-compatible API, one module each."""
