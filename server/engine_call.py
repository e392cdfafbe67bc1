"""Awaiting one call of a batched engine (embeddings, rerank) on behalf of an HTTP request: a
client that leaves first, or the request's deadline, cancels the call."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

from hearth.engine.types import EngineDeadError, InvalidRequestError, QueueFullError
from hearth.server.context import Context, until_disconnected
from hearth.server.errors import client_closed, engine_error, timeout_error

T = TypeVar("T")


async def await_engine(context: Context, call: Coroutine[Any, Any, T]) -> T:
    """The call's result; the engine's InvalidRequestError, QueueFullError and EngineDeadError
    as their API errors (400, 429, 503), a client gone as a 499, the deadline as a timeout."""
    work = asyncio.ensure_future(call)
    watcher = asyncio.ensure_future(until_disconnected(context.http))
    deadline = context.limits.deadline if context.limits else None
    timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
    try:
        await asyncio.wait({work, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        if watcher.done() and not watcher.cancelled():
            raise client_closed()
        raise timeout_error(timeout or 0.0)
    try:
        return work.result()
    except (InvalidRequestError, QueueFullError, EngineDeadError) as exc:
        raise engine_error(exc) from None
