"""Log-probabilities in OpenAI's two shapes: chat (`content[]`) and completions (parallel lists)."""

from __future__ import annotations

import math
from typing import Any

from engine.types import EngineClient, TokenLogprob

FLOOR = -9999.0  # OpenAI's stand-in for log(0); JSON has no -Infinity


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def _token(engine: EngineClient, token_id: int) -> str:
    return engine.decode([token_id])


def chat_logprobs(engine: EngineClient, entries: list[TokenLogprob]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = _token(engine, token_id)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}

    content = [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    engine: EngineClient, entries: list[TokenLogprob], offset: int = 0
) -> dict[str, Any]:
    """`offset`: characters of choice text before the first of these tokens (echoed prompt)."""
    tokens, values, tops, offsets = [], [], [], []
    for entry in entries:
        text = _token(engine, entry.token_id)
        tokens.append(text)
        values.append(_value(entry.logprob))
        tops.append({_token(engine, t): _value(lp) for t, lp in entry.top})
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
