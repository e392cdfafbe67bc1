"""The text side of the engine: tokenizers and chat templates (`tokenizer.py`), incremental
detokenizing with stop strings (`detokenizer.py`), and each token's raw bytes (`token_bytes.py`)."""
