"""The `usage` object every generating route reports."""

from __future__ import annotations


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's chat and completions usage counts (Responses names them input/output_tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
