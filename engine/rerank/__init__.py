"""Rerank models (`task: rerank`): cross-encoders and decoder rerankers on a batching thread."""
