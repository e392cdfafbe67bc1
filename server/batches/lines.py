"""One batch line run through the same serving code as its live route (in process, no HTTP):
the body parsed by the route's pydantic model, then `serve_chat`, `serve_completion`,
`serve_embeddings` or `serve_response` with a Context of its own, at the batch priority.

The answer becomes OpenAI's output line `{id, custom_id, response: {status_code, request_id,
body}, error}`: a 200 goes to the output file; any other status (the route's own 4xx, a 500
for hearth's bug, logged) to the error file. Some failures are not answers but the server's
state: a 429 or a 503 with Retry-After (queue full, loading, draining), a 503 of an engine
(stopped, or failing its requests because the server is shutting down), and any failure while
the server is not ready. `Retry` tells the runner to run such a line again later (after a
restart, if it is going away): it is never stored as the line's answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError

from hearth.server.body_text import invalid_text_param
from hearth.server.chat.protocol import ChatCompletionRequest
from hearth.server.chat.serving import serve_chat
from hearth.server.completions.protocol import CompletionRequest
from hearth.server.completions.serving import serve_completion
from hearth.server.context import Context, new_id
from hearth.server.embeddings.protocol import EmbeddingRequest
from hearth.server.embeddings.serving import serve_embeddings
from hearth.server.errors import APIError, validation_error
from hearth.server.limits import Limits
from hearth.server.model_manager import request_leases
from hearth.server.responses.protocol import ResponseRequest
from hearth.server.responses.serving import serve_response
from hearth.server.responses.store import get_store

log = logging.getLogger("hearth.server")
Serve = Callable[[Any, Context], Awaitable[Any]]


async def _responses(body: ResponseRequest, context: Context) -> Any:
    return await serve_response(body, context, get_store(context.http.app))


ROUTES: dict[str, tuple[type[BaseModel], Serve]] = {
    "/v1/chat/completions": (ChatCompletionRequest, serve_chat),
    "/v1/completions": (CompletionRequest, serve_completion),
    "/v1/embeddings": (EmbeddingRequest, serve_embeddings),
    "/v1/responses": (ResponseRequest, _responses),
}
GENERATES = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}  # priority applies
ENGINE_GONE = ("service_unavailable", "engine_dead")  # 503 codes of server/errors.py
MAX_WAIT_S = 5.0


class Retry(Exception):
    """Not answered now (queue full, model loading, server draining): run it again in
    `after_s` seconds."""

    def __init__(self, after_s: float) -> None:
        super().__init__(after_s)
        self.after_s = after_s


class LineRequest:
    """What serving reads of an HTTP request, for a line that has none: the app (settings,
    stores), and a client that never leaves (a cancelled batch cancels the line's task)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def receive(self) -> dict[str, Any]:
        await asyncio.get_running_loop().create_future()  # waits until cancelled
        return {"type": "http.disconnect"}  # never reached


async def run_line(
    app: FastAPI, endpoint: str, custom_id: str, body: dict[str, Any], priority: int
) -> tuple[dict[str, Any], bool]:
    """(the output line, whether it is an error line); Retry when it should run later."""
    request_id = new_id("req")
    try:
        answer = await _serve(app, endpoint, body, priority)
        status, payload = 200, answer
    except APIError as exc:
        after = _retry_after(app, exc)
        if after is not None:
            raise Retry(after) from None
        status, payload = exc.status, exc.body()
    except Exception as exc:
        if app.state.registry.state != "ready":  # cut off by the shutdown: not its answer
            raise Retry(1.0) from None
        log.exception("batch line %s failed", custom_id)
        status, payload = 500, APIError(500, f"internal error: {type(exc).__name__}").body()
    line = {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": payload},
        "error": None,
    }
    return line, status != 200


def _retry_after(app: FastAPI, exc: APIError) -> float | None:
    """Seconds to wait before running the line again; None: `exc` is the line's answer."""
    header = (exc.headers or {}).get("Retry-After")
    if header is not None and exc.status in (429, 503):
        return min(float(header), MAX_WAIT_S)
    if exc.status == 429 or app.state.registry.state != "ready":
        return 1.0
    if exc.status == 503 and exc.code in ENGINE_GONE:
        return MAX_WAIT_S
    return None


async def _serve(app: FastAPI, endpoint: str, body: dict[str, Any], priority: int) -> Any:
    model, serve = ROUTES[endpoint]
    bad_text = invalid_text_param(json.dumps(body).encode())  # lone surrogates: escaped
    if bad_text is not None:
        raise APIError(400, bad_text[1], param=bad_text[0])
    for field in ("stream", "background"):
        if body.get(field):
            raise APIError(400, f"{field} is not supported in a batch.", param=field)
    if endpoint in GENERATES:
        body = {**body, "priority": priority}
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    state = app.state
    context = Context(
        LineRequest(app),  # type: ignore[arg-type]
        state.registry,
        getattr(state, "metrics", None),
        Limits(state.settings.max_n, None),
    )
    with request_leases():  # models it acquires stay loaded until the line ends
        return await serve(parsed, context)
