"""POST /v1/embeddings."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hearth.server.auth import require_api_key
from hearth.server.context import Context
from hearth.server.embeddings.protocol import EmbeddingRequest
from hearth.server.embeddings.serving import serve_embeddings

router = APIRouter()


@router.post("/v1/embeddings", dependencies=[Depends(require_api_key)], response_model=None)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    result: dict[str, Any] = await serve_embeddings(body, Context.of(request))
    return JSONResponse(result)  # plain json.dumps: no per-float encoder pass
