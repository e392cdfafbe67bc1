"""Serving /v1/embeddings: inputs checked and sent to the model's embedding engine, vectors back
as OpenAI's list of `embedding` objects (floats, or base64 of little-endian float32)."""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any, cast

from hearth.engine.types import EmbeddingClient
from hearth.engine.types import EmbeddingRequest as EngineRequest
from hearth.server.context import Context, new_id
from hearth.server.embeddings.protocol import EmbeddingRequest
from hearth.server.engine_call import await_engine
from hearth.server.errors import APIError


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
    result = await await_engine(context, engine.embed(request))
    if context.metrics is not None:
        context.metrics.request_started(engine.info.model_id, result.prompt_tokens)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
        for i, vector in enumerate(result.embeddings)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": body.model, "usage": usage}


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    """A vector as floats, or as base64 of its little-endian float32 bytes (OpenAI's)."""
    if encoding_format == "float":
        return vector
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
