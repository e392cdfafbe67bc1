"""OpenAI's Batch API (`/v1/batches`): files of requests run online at a low priority."""
