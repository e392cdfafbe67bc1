"""Per-request guards: body size (413 before the body is read), a deadline, n and stop limits.

RequestGuard puts each request's Limits in its ASGI scope state; routes pass them to serving
(generation.Context), which checks them with check_request before the engine sees the request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from hearth.engine.types import GenerationRequest
from hearth.server.body_text import invalid_text_param
from hearth.server.errors import APIError, envelope
from hearth.server.model_manager import request_leases
from hearth.server.registry import ModelRegistry
from hearth.server.streaming import dumps

MAX_STOP_CHARS = 256  # per stop string (OpenAI caps their number at 4; so does the protocol)
DRAIN_AT_MOST = 64 << 20  # an oversized body is read and dropped up to this, so the 413 arrives
UNGUARDED = ("/health", "/health/live", "/metrics")  # never counted in flight, never limited
UPLOADS = ("/v1/files",)  # bodies limited by the upload size (ServerSettings.max_file_bytes)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and by when (event-loop time) it must be done."""

    max_n: int
    deadline: float | None = None


def check_request(request: GenerationRequest, limits: Limits | None) -> float | None:
    """Raise a 400 for an n or a stop string over the limits; returns the request's deadline."""
    if limits is None:
        return None
    sampling = request.sampling
    if sampling.n > limits.max_n:
        raise APIError(400, f"n must be at most {limits.max_n}, got {sampling.n}.", param="n")
    for stop in sampling.stop:
        if len(stop) > MAX_STOP_CHARS:
            raise APIError(
                400, f"Each stop string may have at most {MAX_STOP_CHARS} characters.", param="stop"
            )
    return limits.deadline


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RequestGuard:
    """ASGI middleware: refuses oversized bodies with 413 before parsing them, counts requests
    in flight on the registry (for draining), and gives each request its limits and deadline
    (scope["state"]["limits"]: request.state.limits to the route).
    """

    def __init__(
        self,
        app: Any,
        registry: ModelRegistry,
        max_body_bytes: int,
        max_n: int,
        request_timeout_s: float | None,
        max_upload_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes or max_body_bytes
        self.max_n = max_n
        self.request_timeout_s = request_timeout_s

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED:
            await self.app(scope, receive, send)
            return
        self.registry.in_flight += 1
        try:
            upload = scope["path"] in UPLOADS
            limit = self.max_upload_bytes if upload else self.max_body_bytes
            body = await self._read_body(scope, receive, limit)
            if body is None:
                await _too_large(send, limit, scope["path"])
                return
            bad_text = None if upload else invalid_text_param(body)
            if bad_text is not None:  # decided here once, for every route (server/body_text.py)
                param, message = bad_text
                await _send_error(send, scope["path"], APIError(400, message, param=param))
                return
            deadline = None
            if self.request_timeout_s is not None:
                deadline = asyncio.get_running_loop().time() + self.request_timeout_s
            scope.setdefault("state", {})["limits"] = Limits(self.max_n, deadline)
            with request_leases():  # models it acquires stay loaded until it ends
                await self.app(scope, _replay(body, receive), send)
        finally:
            self.registry.in_flight -= 1

    async def _read_body(self, scope: dict[str, Any], receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None when it is over `limit` (then drained, up to a bound)."""
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            if int(declared) <= DRAIN_AT_MOST:
                await _drain(receive, DRAIN_AT_MOST)
            return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                return b"".join(chunks) if size else b""
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                if message.get("more_body", False):
                    await _drain(receive, DRAIN_AT_MOST - size)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the body already read, then the client's next messages."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _drain(receive: Receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


async def _too_large(send: Send, limit: int, path: str) -> None:
    error = APIError(
        413,
        f"The request body is larger than the server's limit of {limit} bytes.",
        code="request_too_large",
    )
    await _send_error(send, path, error, close=True)


async def _send_error(send: Send, path: str, error: APIError, close: bool = False) -> None:
    """`error` as a whole JSON response in the envelope of the route at `path` (errors.envelope);
    `close` ends the connection (a body left unread)."""
    status, payload = envelope(path, error)
    data = dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
