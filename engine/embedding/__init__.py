"""Embedding models: loading with their pooling config, pooling, and the batching engine."""
