"""POST /v1/chat/completions, streamed (SSE chunks) or not."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from engine.types import EngineClient, GenerationOutput, GenerationRequest
from server.auth import require_api_key
from server.generation import (
    check_text_length,
    new_id,
    open_stream,
    raise_for_output,
    resolve_max_tokens,
    run_to_completion,
    tokenize,
    usage,
)
from server.logprobs import chat_logprobs
from server.protocol import ChatCompletionRequest
from server.streaming import event_stream, sse

router = APIRouter()


@dataclass
class _Reply:
    """What every chunk or response of one request shares."""

    id: str
    model: str
    created: int
    engine: EngineClient
    prompt_tokens: int

    def base(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


@router.post("/v1/chat/completions", dependencies=[Depends(require_api_key)], response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    engine = request.app.state.registry.get(body.model)
    messages = [m.to_template() for m in body.messages]
    check_text_length(engine, sum(len(m["content"]) for m in messages), "messages")
    prompt_ids = await tokenize(engine.encode_chat, messages, body.tools)
    max_tokens = resolve_max_tokens(
        engine, len(prompt_ids), body.requested_max_tokens, body.max_tokens_param
    )
    sampling = body.sampling_params(max_tokens, engine.info.default_sampling, body.logprobs_k)
    reply = _Reply(new_id("chatcmpl"), body.model, int(time.time()), engine, len(prompt_ids))
    if body.stream:
        metrics = request.app.state.metrics
        outputs = await open_stream(
            engine, GenerationRequest(reply.id, prompt_ids, sampling), metrics
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_chunks(reply, outputs, sampling.n, include_usage, metrics))
    result = await run_to_completion(request, engine, reply.id, prompt_ids, sampling)
    return {
        **reply.base("chat.completion"),
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text, "refusal": None},
                "logprobs": chat_logprobs(engine, choice.logprobs) if body.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
            for choice in result.choices
        ],
        "usage": result.usage(),
    }


async def _chunks(
    reply: _Reply,
    outputs: AsyncIterator[GenerationOutput],
    n: int,
    include_usage: bool,
    metrics: Any,
) -> AsyncIterator[str]:
    """First a role delta per choice, then content deltas, a finish chunk, optional usage."""
    base = reply.base("chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, logprobs: Any = None, finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    completion_tokens = 0
    async for output in outputs:
        raise_for_output(output)
        completion_tokens += len(output.token_ids)
        if output.text or output.logprobs:
            logprobs = chat_logprobs(reply.engine, output.logprobs) if output.logprobs else None
            yield chunk(output.index, {"content": output.text}, logprobs)
        if output.finish_reason is not None:
            yield chunk(output.index, {}, finish=output.finish_reason)
    metrics.request_finished(reply.engine.info.model_id, completion_tokens)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(reply.prompt_tokens, completion_tokens)})
