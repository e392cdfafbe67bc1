"""POST /v1/rerank (/rerank, /v2/rerank: Cohere's and Jina's shapes) and POST /score (vLLM's):
protocol (request models), serving, route."""
