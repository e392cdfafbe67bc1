"""OpenAI's Files API (`/v1/files`): uploaded batch inputs and batch output files."""
