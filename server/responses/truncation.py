"""Responses' `truncation`: "auto" drops the oldest conversation items until the prompt fits.

OpenAI's semantics: with "auto", an input (with its stored conversation) longer than the
model's context loses items from its beginning until it fits; with "disabled" (the default)
it is a 400. Instructions (the system turn) are never dropped, nor the last turn. A tool result
left first, its call dropped, goes too (a template cannot render a result without its call).

"Fits" means room for the prompt and `max_output_tokens` (at least one token when unset). The
number of items to drop is found by bisection: O(log n) preparations of the turn
(server/turn.py), each rendering the template in a worker thread.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hearth.server.errors import APIError

Messages = list[dict[str, Any]]
T = TypeVar("T")


def _tail(turns: Messages, dropped: int) -> Messages:
    """The turns after the first `dropped`, without tool results whose call went with them."""
    rest = turns[dropped:]
    while len(rest) > 1 and rest[0]["role"] == "tool":
        rest = rest[1:]
    return rest


async def encode_fitting(
    encode: Callable[[Messages], Awaitable[T]],
    size: Callable[[T], int],
    turns: Messages,
    truncation: str | None,
    limit: int,
    room: int,
) -> T:
    """`encode(turns)` (a prompt of `size` tokens), the oldest turns dropped until the prompt and
    `room` tokens fit in `limit` when `truncation` is "auto". What cannot fit even then is
    returned whole: the caller's length check says so (a 400 naming `input`)."""
    whole = await encode(turns)
    if truncation != "auto" or size(whole) + room <= limit or len(turns) < 2:
        return whole

    async def fitting(dropped: int) -> T | None:
        try:
            encoded = await encode(_tail(turns, dropped))
        except APIError as exc:
            if exc.code == "context_length_exceeded":  # the text alone is too long
                return None
            raise
        return encoded if size(encoded) + room <= limit else None

    last = len(turns) - 1
    best = await fitting(last)
    if best is None:  # the last turn alone does not fit
        return whole
    low, high = 0, last  # dropping `low` turns does not fit; dropping `high` does
    while high - low > 1:
        middle = (low + high) // 2
        encoded = await fitting(middle)
        if encoded is None:
            low = middle
        else:
            high, best = middle, encoded
    return best
