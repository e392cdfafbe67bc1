"""POST /v1/embeddings (OpenAI's shapes): protocol (request model), serving, route."""
