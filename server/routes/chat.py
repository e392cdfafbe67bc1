"""POST /v1/chat/completions."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.auth import require_api_key
from server.errors import APIError
from server.generation import new_id, resolve_max_tokens, run_to_completion
from server.protocol import ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> dict[str, Any]:
    engine = request.app.state.registry.get(body.model)
    if body.stream:
        raise APIError(400, "stream=true is not supported yet", param="stream")
    messages = [m.to_template() for m in body.messages]
    try:
        prompt_ids = engine.encode_chat(messages, body.tools)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    max_tokens = resolve_max_tokens(engine, len(prompt_ids), body.requested_max_tokens)
    sampling = body.sampling_params(max_tokens, engine.info.default_sampling, body.logprobs_k)
    request_id = new_id("chatcmpl")
    result = await run_to_completion(engine, request_id, prompt_ids, sampling)
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for choice in result.choices
        ],
        "usage": result.usage(),
        "system_fingerprint": None,
    }
