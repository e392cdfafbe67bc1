"""POST /v1/completions: legacy text completions, streamed (SSE chunks) or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from hearth.server.auth import require_api_key
from hearth.server.completions.protocol import CompletionRequest
from hearth.server.completions.serving import serve_completion
from hearth.server.context import Context

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(require_api_key)], response_model=None)
async def create_completion(
    body: CompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    return await serve_completion(body, Context.of(request))
