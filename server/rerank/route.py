"""POST /v1/rerank, /rerank, /v2/rerank and POST /score (vLLM's paths)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hearth.server.auth import require_api_key
from hearth.server.context import Context
from hearth.server.rerank.protocol import RerankRequest, ScoreRequest
from hearth.server.rerank.serving import serve_rerank, serve_score

router = APIRouter()
_auth = [Depends(require_api_key)]


@router.post("/v1/rerank", dependencies=_auth, response_model=None)
@router.post("/rerank", dependencies=_auth, response_model=None)
@router.post("/v2/rerank", dependencies=_auth, response_model=None)
async def create_rerank(body: RerankRequest, request: Request) -> JSONResponse:
    result: dict[str, Any] = await serve_rerank(body, Context.of(request))
    return JSONResponse(result)


@router.post("/score", dependencies=_auth, response_model=None)
@router.post("/v1/score", dependencies=_auth, response_model=None)
async def create_score(body: ScoreRequest, request: Request) -> JSONResponse:
    result: dict[str, Any] = await serve_score(body, Context.of(request))
    return JSONResponse(result)
