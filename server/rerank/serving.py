"""Serving /v1/rerank and /score: pairs checked and sent to the model's rerank engine, scores back
as vLLM returns them (rerank: results sorted by relevance_score, each with its document index;
score: one `score` object per pair, in pair order)."""

from __future__ import annotations

import time
from typing import Any, cast

from hearth.engine.types import RerankClient, RerankResult
from hearth.engine.types import RerankRequest as EngineRequest
from hearth.server.context import Context, new_id
from hearth.server.engine_call import await_engine
from hearth.server.errors import APIError
from hearth.server.rerank.protocol import RerankRequest, ScoreRequest


async def serve_rerank(body: RerankRequest, context: Context) -> dict[str, Any]:
    """The rerank response: {id, model, usage, results: [{index, relevance_score, document}]}."""
    documents = body.texts()
    pairs = [(body.query, document) for document in documents]
    request_id = new_id("rerank")
    result = await _score(context, body.model, request_id, pairs, "documents", body)
    order = sorted(range(len(pairs)), key=lambda i: result.scores[i], reverse=True)
    if body.top_n:
        order = order[: body.top_n]
    results = []
    for i in order:
        item: dict[str, Any] = {"index": i, "relevance_score": result.scores[i]}
        if body.return_documents:
            item["document"] = {"text": documents[i]}
        results.append(item)
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"id": request_id, "model": body.model, "usage": usage, "results": results}


async def serve_score(body: ScoreRequest, context: Context) -> dict[str, Any]:
    """vLLM's ScoreResponse: {id, object: list, created, model, data: [{index, object: score,
    score}], usage}."""
    first = [body.text_1] if isinstance(body.text_1, str) else body.text_1
    second = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise APIError(
            400,
            f"text_1 has {len(first)} texts and text_2 {len(second)}: pair them one to one, one "
            "to many (a single text_1) or many to many (equal lengths).",
            param="text_2",
        )
    pairs = list(zip(first, second, strict=True))
    request_id = new_id("score")
    result = await _score(context, body.model, request_id, pairs, "text_2", body)
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(result.scores)]
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "total_tokens": result.prompt_tokens,
        "completion_tokens": 0,
    }
    return {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "model": body.model,
        "data": data,
        "usage": usage,
    }


async def _score(
    context: Context,
    model: str,
    request_id: str,
    pairs: list[tuple[str, str]],
    field: str,
    body: RerankRequest | ScoreRequest,
) -> RerankResult:
    engine = cast(RerankClient, await context.registry.acquire(model, task="rerank"))
    if len(pairs) > engine.max_inputs:
        raise APIError(
            400,
            f"{field} has {len(pairs)} items; this model takes at most {engine.max_inputs} per "
            "request.",
            param=field,
        )
    request = EngineRequest(request_id, pairs, body.truncate_prompt_tokens, field)
    result = await await_engine(context, engine.rerank(request))
    if context.metrics is not None:
        context.metrics.request_started(engine.info.model_id, result.prompt_tokens)
    return result
