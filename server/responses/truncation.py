"""Responses' `truncation`: "auto" drops the oldest conversation items until the prompt fits.

OpenAI's semantics: with "auto", an input (with its stored conversation) longer than the
model's context loses items from its beginning until it fits; with "disabled" (the default)
it is a 400. Instructions (the system turn) are never dropped, nor the last turn. A tool result
left first, its call dropped, goes too (a template cannot render a result without its call).

"Fits" means room for the prompt and `max_output_tokens` (at least one token when unset). The
number of items to drop is found by bisection: O(log n) renderings of the template, each in a
worker thread (server.generation.tokenize).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from hearth.server.errors import APIError

Messages = list[dict[str, Any]]


def _tail(turns: Messages, dropped: int) -> Messages:
    """The turns after the first `dropped`, without tool results whose call went with them."""
    rest = turns[dropped:]
    while len(rest) > 1 and rest[0]["role"] == "tool":
        rest = rest[1:]
    return rest


async def encode_fitting(
    encode: Callable[[Messages], Awaitable[list[int]]],
    system: Messages,
    turns: Messages,
    truncation: str | None,
    limit: int,
    room: int,
) -> list[int]:
    """The prompt ids of `system` + `turns`, the oldest turns dropped until the prompt and `room`
    tokens fit in `limit` when `truncation` is "auto". What cannot fit even then is returned
    whole: the caller's length check says so (a 400 naming `input`)."""
    whole = await encode([*system, *turns])
    if truncation != "auto" or len(whole) + room <= limit or len(turns) < 2:
        return whole

    async def fitting(dropped: int) -> list[int] | None:
        try:
            ids = await encode([*system, *_tail(turns, dropped)])
        except APIError as exc:
            if exc.code == "context_length_exceeded":  # the text alone is too long
                return None
            raise
        return ids if len(ids) + room <= limit else None

    last = len(turns) - 1
    best = await fitting(last)
    if best is None:  # the last turn alone does not fit
        return whole
    low, high = 0, last  # dropping `low` turns does not fit; dropping `high` does
    while high - low > 1:
        middle = (low + high) // 2
        ids = await fitting(middle)
        if ids is None:
            low = middle
        else:
            high, best = middle, ids
    return best
