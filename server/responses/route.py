"""POST /v1/responses, GET|DELETE /v1/responses/{id} (OpenAI's Responses API)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from hearth.server.auth import require_api_key
from hearth.server.generation import Context
from hearth.server.responses import serving
from hearth.server.responses.protocol import ResponseRequest
from hearth.server.responses.store import get_store

router = APIRouter()
AUTH = [Depends(require_api_key)]


@router.post("/v1/responses", dependencies=AUTH, response_model=None)
async def create_response(
    body: ResponseRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    return await serving.serve_response(body, Context.of(request), get_store(request.app))


@router.get("/v1/responses/{response_id}", dependencies=AUTH)
async def retrieve_response(response_id: str, request: Request) -> dict[str, Any]:
    return serving.retrieve(get_store(request.app), response_id)


@router.delete("/v1/responses/{response_id}", dependencies=AUTH)
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    return serving.delete(get_store(request.app), response_id)
