"""POST /v1/chat/completions, streamed (SSE chunks) or not."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from hearth.server.auth import require_api_key
from hearth.server.chat.protocol import ChatCompletionRequest
from hearth.server.chat.serving import serve_chat
from hearth.server.context import Context

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)], response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    return await serve_chat(body, Context.of(request))
