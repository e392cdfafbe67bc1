"""Shared request plumbing: context-length checks, running a request to completion."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from engine.types import EngineClient, GenerationOutput, GenerationRequest, SamplingParams
from server.errors import APIError


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def resolve_max_tokens(engine: EngineClient, prompt_len: int, requested: int | None) -> int:
    """The request's max_tokens, or what is left of the context; 400 naming both numbers."""
    limit = engine.info.max_model_len
    if requested is None:
        requested = engine.info.default_sampling.get("max_tokens")
        if requested is None or prompt_len + requested > limit:
            requested = limit - prompt_len
        if requested < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, your prompt "
                f"has {prompt_len} tokens, leaving no room for a completion.",
                param="messages",
                code="context_length_exceeded",
            )
        return requested
    if prompt_len + requested > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return requested


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)


@dataclass
class Completed:
    prompt_tokens: int
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


def raise_for_output(output: GenerationOutput) -> None:
    if output.finish_reason == "error":
        raise APIError(500, output.error or "engine error", code="engine_error")


async def run_to_completion(
    engine: EngineClient, request_id: str, prompt_ids: list[int], sampling: SamplingParams
) -> Completed:
    """Run one request and collect every sample; engine-side rejections become 400s."""
    request = GenerationRequest(request_id, prompt_ids, sampling)
    choices = [Choice(i) for i in range(sampling.n)]
    try:
        async for output in engine.generate(request):
            raise_for_output(output)
            choice = choices[output.index]
            choice.text += output.text
            choice.token_ids += output.token_ids
            if output.logprobs:
                choice.logprobs += output.logprobs
            if output.finish_reason is not None:
                choice.finish_reason = output.finish_reason
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    return Completed(len(prompt_ids), choices)
