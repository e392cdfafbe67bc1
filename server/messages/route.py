"""POST /v1/messages (streamed as Anthropic's events, or not) and /v1/messages/count_tokens.

Clients send `anthropic-version` (and `anthropic-beta`): accepted, not checked; the key comes as
`x-api-key` or `Authorization: Bearer` (server/auth.py). Errors on these paths leave in
Anthropic's envelope (server/errors.py, `envelope`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from hearth.server.auth import require_api_key
from hearth.server.context import Context
from hearth.server.messages.protocol import Conversation, MessagesRequest
from hearth.server.messages.serving import count_tokens, serve_messages

router = APIRouter()
AUTH = [Depends(require_api_key)]


@router.post("/v1/messages", dependencies=AUTH, response_model=None)
async def create_message(
    body: MessagesRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    return await serve_messages(body, Context.of(request))


@router.post("/v1/messages/count_tokens", dependencies=AUTH)
async def count_message_tokens(body: Conversation, request: Request) -> dict[str, int]:
    return await count_tokens(body, Context.of(request))
