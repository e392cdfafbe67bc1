"""Serving /v1/embeddings: inputs checked and sent to the model's embedding engine, vectors back
as OpenAI's list of `embedding` objects (floats, or base64 of little-endian float32)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
from array import array
from typing import Any, cast

from hearth.engine.types import (
    EmbeddingClient,
    EngineDeadError,
    InvalidRequestError,
    QueueFullError,
)
from hearth.engine.types import EmbeddingRequest as EngineRequest
from hearth.server.context import Context, new_id, until_disconnected
from hearth.server.embeddings.protocol import EmbeddingRequest
from hearth.server.errors import APIError, client_closed, engine_error, timeout_error


async def serve_embeddings(body: EmbeddingRequest, context: Context) -> dict[str, Any]:
    """OpenAI's CreateEmbeddingResponse for the request."""
    engine = cast(EmbeddingClient, await context.registry.acquire(body.model, task="embed"))
    inputs = body.inputs()
    limit = engine.max_inputs
    if len(inputs) > limit:
        raise APIError(
            400,
            f"input has {len(inputs)} items; this model takes at most {limit} per request.",
            param="input",
        )
    request = EngineRequest(new_id("embd"), inputs, body.dimensions, body.prompt_name)
    result = await _run(context, engine, request)
    if context.metrics is not None:
        context.metrics.request_started(engine.info.model_id, result.prompt_tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
        for i, vector in enumerate(result.embeddings)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}


async def _run(context: Context, engine: EmbeddingClient, request: EngineRequest) -> Any:
    """The engine's result; a client that leaves first, or the deadline, cancels the request."""
    work = asyncio.ensure_future(engine.embed(request))
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


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as floats, or as base64 of its little-endian float32 bytes (OpenAI's)."""
    if encoding_format == "float":
        return vector
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
