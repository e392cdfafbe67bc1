"""POST /tokenize and POST /detokenize (vLLM's paths: no /v1 prefix)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from hearth.server.auth import require_api_key
from hearth.server.context import Context
from hearth.server.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from hearth.server.tokenize.serving import serve_detokenize, serve_tokenize

router = APIRouter()


@router.post("/tokenize", dependencies=[Depends(require_api_key)])
async def create_tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    return await serve_tokenize(body, Context.of(request))


@router.post("/detokenize", dependencies=[Depends(require_api_key)])
async def create_detokenize(body: DetokenizeRequest, request: Request) -> dict[str, str]:
    return await serve_detokenize(body, Context.of(request))
