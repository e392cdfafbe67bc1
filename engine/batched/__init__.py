"""Models served without a KV cache by one batching thread (embedding and rerank models)."""
