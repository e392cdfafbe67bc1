"""Server-sent events exactly as OpenAI frames them, and a stream that ends cleanly on errors."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from hearth.server.errors import APIError, error_body

log = logging.getLogger("hearth.server")

DONE = "data: [DONE]\n\n"


def dumps(payload: Any) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: Any, event: str | None = None) -> str:
    """One event: optional `event:` line, a `data:` line, a blank line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {dumps(payload)}\n\n"


def error_event(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return sse(exc.body())
    log.exception("stream failed")
    return sse(error_body(f"internal error: {type(exc).__name__}: {exc}"))


def event_stream(events: AsyncIterator[str], done: bool = True) -> StreamingResponse:
    """An SSE response; a failure mid-stream becomes an error event (then [DONE] if `done`)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # the status line is gone: report in-band
            yield error_event(exc)
        if done:
            yield DONE

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
