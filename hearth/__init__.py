"""hearth: a self-hosted, OpenAI-compatible inference server for Hugging Face checkpoints."""

__version__ = "0.1.0"
