"""POST /v1/responses, GET|DELETE /v1/responses/{id} (OpenAI's Responses API)."""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.types import EngineClient, GenerationOutput, GenerationRequest, SamplingParams
from server.auth import require_api_key
from server.errors import APIError
from server.generation import (
    check_text_length,
    new_id,
    open_stream,
    resolve_max_tokens,
    run_to_completion,
    tokenize,
)
from server.response_store import ResponseStore, get_store
from server.streaming import event_stream, sse

log = logging.getLogger("hearth.server")
router = APIRouter()
AUTH = [Depends(require_api_key)]
# Per-model defaults (models.yaml) used where the request lacks the field or leaves it unset.
DEFAULTED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


# -- request ---------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Model):
    type: Literal["input_text", "output_text"]
    text: str


class InputMessage(_Model):
    """A message item; its `content` may be a plain string."""

    type: str = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[ContentPart]

    @field_validator("type")
    @classmethod
    def _only_messages(cls, value: str) -> str:
        if value != "message":
            raise ValueError(
                f"input items of type '{value}' are not supported yet; send 'message' items"
            )
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _string_content(cls, value: Any) -> Any:
        return [{"type": "input_text", "text": value}] if isinstance(value, str) else value

    def to_template(self) -> dict[str, str]:
        """The dict chat templates expect; `developer` is rendered as `system`."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": "".join(part.text for part in self.content)}


class ResponseRequest(_Model):
    model: str
    input: list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = None
    store: bool | None = None  # None means true
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _string_input(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    def sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        params = {name: defaults[name] for name in DEFAULTED if name in defaults}
        params.update(self.model_dump(include={"temperature", "top_p"}, exclude_none=True))
        return SamplingParams(max_tokens=max_tokens, **params)


# -- response objects --------------------------------------------------------------------------


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass
class Reply:
    """One response under construction: what its object echoes of the request, and ids."""

    body: ResponseRequest
    sampling: SamplingParams
    prompt_tokens: int
    id: str = field(default_factory=lambda: new_id("resp"))
    message_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: int = field(default_factory=lambda: int(time.time()))

    def message(self, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": [output_text(text)],
        }

    def snapshot(self, status: str, **outcome: Any) -> dict[str, Any]:
        """The response object in `status`; `outcome` overrides output, usage, error, ..."""
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "model": body.model,
            "output": [],
            "parallel_tool_calls": True,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.store is not False,
            "temperature": self.sampling.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": self.sampling.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": body.user,
            "metadata": body.metadata or {},
            **outcome,
        }

    def finish(
        self, text: str, finish_reason: str | None, output_tokens: int, error: str | None = None
    ) -> dict[str, Any]:
        """The final object: completed, incomplete (max_output_tokens) or failed."""
        if error is not None or finish_reason in ("error", "abort"):
            message = error or f"generation stopped: {finish_reason}"
            status, outcome = "failed", {"error": {"code": "server_error", "message": message}}
        elif finish_reason == "length":
            status, outcome = "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}
        else:
            status, outcome = "completed", {"completed_at": int(time.time())}
        item_status = "completed" if status == "completed" else "incomplete"
        return self.snapshot(
            status,
            output=[self.message(text, item_status)],
            usage=response_usage(self.prompt_tokens, output_tokens),
            **outcome,
        )


# -- conversation and storage ------------------------------------------------------------------


def not_found(response_id: str, param: str | None = None) -> APIError:
    prefix = "Previous response" if param else "Response"
    code = "previous_response_not_found" if param else None
    return APIError(404, f"{prefix} with id '{response_id}' not found.", param=param, code=code)


def conversation(body: ResponseRequest, store: ResponseStore) -> list[dict[str, str]]:
    """The turns so far: the previous response's conversation, then this request's input."""
    history: list[dict[str, str]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        history = previous.messages
    return [*history, *(item.to_template() for item in body.input)]


def keep(store: ResponseStore, turns: list[dict[str, str]], response: dict[str, Any]) -> None:
    """Store a finished response (unless store=false or it failed) with its conversation."""
    if not response["store"] or response["status"] == "failed":
        return
    text = response["output"][0]["content"][0]["text"]
    store.put(response, [*turns, {"role": "assistant", "content": text}])


async def encode(engine: EngineClient, messages: list[dict[str, str]]) -> list[int]:
    check_text_length(engine, sum(len(m["content"]) for m in messages), "input")
    return await tokenize(engine.encode_chat, messages, param="input")


# -- streaming ---------------------------------------------------------------------------------


async def stream_events(
    reply: Reply,
    outputs: AsyncIterator[GenerationOutput],
    settle: Callable[[dict[str, Any]], None],
) -> AsyncIterator[str]:
    """The Responses event sequence for one message; an engine failure ends in response.failed."""
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> str:
        return sse({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

    where = {"item_id": reply.message_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=reply.snapshot("in_progress"))
    yield event("response.in_progress", response=reply.snapshot("in_progress"))
    yield event("response.output_item.added", output_index=0, item=reply.message("", "in_progress"))
    yield event("response.content_part.added", **where, part=output_text(""))
    text, tokens, reason, error = "", 0, None, None
    try:
        async for output in outputs:
            tokens += len(output.token_ids)
            reason = output.finish_reason or reason
            if output.finish_reason == "error":
                error = output.error or "engine error"
                break
            if output.text:
                text += output.text
                yield event("response.output_text.delta", **where, delta=output.text, logprobs=[])
    except Exception as exc:  # the engine failed mid-stream; the status line is long gone
        log.exception("response stream failed")
        error = f"{type(exc).__name__}: {exc}"
    finally:
        await outputs.aclose()  # a no-op when finished; aborts the request otherwise
    final = reply.finish(text, reason, tokens, error)
    if final["status"] != "failed":
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=output_text(text))
        yield event("response.output_item.done", output_index=0, item=final["output"][0])
    settle(final)
    yield event(f"response.{final['status']}", response=final)


# -- routes ------------------------------------------------------------------------------------


@router.post("/v1/responses", dependencies=AUTH, response_model=None)
async def create_response(
    body: ResponseRequest, request: Request
) -> dict[str, Any] | StreamingResponse:
    engine = request.app.state.registry.get(body.model)
    store = get_store(request.app)
    turns = conversation(body, store)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    prompt_ids = await encode(engine, [*system, *turns])
    max_tokens = resolve_max_tokens(
        engine, len(prompt_ids), body.max_output_tokens, "max_output_tokens"
    )
    sampling = body.sampling_params(max_tokens, engine.info.default_sampling)
    reply = Reply(body, sampling, len(prompt_ids))
    if body.stream:
        metrics = request.app.state.metrics
        outputs = await open_stream(
            engine, GenerationRequest(reply.id, prompt_ids, sampling), metrics
        )

        def settle(response: dict[str, Any]) -> None:
            metrics.request_finished(engine.info.model_id, response["usage"]["output_tokens"])
            keep(store, turns, response)

        return event_stream(stream_events(reply, outputs, settle), done=False)
    result = await run_to_completion(request, engine, reply.id, prompt_ids, sampling)
    choice = result.choices[0]
    response = reply.finish(choice.text, choice.finish_reason, len(choice.token_ids))
    if response["status"] == "failed":
        raise APIError(500, response["error"]["message"], code="engine_error")
    keep(store, turns, response)
    return response


@router.get("/v1/responses/{response_id}", dependencies=AUTH)
async def retrieve_response(response_id: str, request: Request) -> dict[str, Any]:
    stored = get_store(request.app).get(response_id)
    if stored is None:
        raise not_found(response_id)
    return stored.response


@router.delete("/v1/responses/{response_id}", dependencies=AUTH)
async def delete_response(response_id: str, request: Request) -> dict[str, Any]:
    if get_store(request.app).pop(response_id) is None:
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
