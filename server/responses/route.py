"""POST /v1/responses, GET|DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items and
POST /v1/responses/{id}/cancel (OpenAI's Responses API)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from hearth.server.auth import require_api_key
from hearth.server.context import Context
from hearth.server.responses import background, serving
from hearth.server.responses.items import page
from hearth.server.responses.protocol import ResponseRequest
from hearth.server.responses.store import get_store

router = APIRouter()
AUTH = [Depends(require_api_key)]


@router.post("/v1/responses", dependencies=AUTH, response_model=None)
async def create_response(
    body: ResponseRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    return await serving.serve_response(body, Context.of(request), get_store(request.app))


@router.get("/v1/responses/{response_id}", dependencies=AUTH, response_model=None)
async def retrieve_response(
    response_id: str,
    request: Request,
    stream: bool = False,
    starting_after: int | None = Query(None, ge=-1),
) -> dict[str, Any] | StreamingResponse:
    store = get_store(request.app)
    if stream:
        runs = background.get_runs(request.app)
        return background.resume(store, runs, response_id, starting_after)
    return serving.retrieve(store, response_id)


@router.delete("/v1/responses/{response_id}", dependencies=AUTH)
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    run = background.get_runs(request.app).get(response_id)
    if run is not None:  # still running: it would store itself again
        await run.cancel()
    return serving.delete(get_store(request.app), response_id)


@router.get("/v1/responses/{response_id}/input_items", dependencies=AUTH)
async def list_input_items(
    response_id: str,
    request: Request,
    after: str | None = None,
    limit: int = Query(20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    stored = get_store(request.app).get(response_id)
    if stored is None:
        raise serving.not_found(response_id)
    return page(stored.input_items, after, limit, order)


@router.post("/v1/responses/{response_id}/cancel", dependencies=AUTH)
async def cancel_response(response_id: str, request: Request) -> dict[str, Any]:
    runs = background.get_runs(request.app)
    return await background.cancel(get_store(request.app), runs, response_id)
