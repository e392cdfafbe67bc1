"""Prompts against the context: tokenizing off the event loop, the text-length check before it,
and max_tokens resolved against what the prompt leaves."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from hearth.engine.types import EngineClient, InvalidRequestError
from hearth.server.errors import APIError, context_error

T = TypeVar("T")


def check_text_length(engine: EngineClient, text_chars: int, param: str) -> None:
    """Reject text that cannot fit before tokenizing it (no token is longer than the longest)."""
    at_least = text_chars // engine.info.max_token_chars
    if at_least >= engine.info.max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {engine.info.max_model_len} tokens. "
            f"However, your input has {text_chars} characters, which is at least {at_least} "
            "tokens.",
            param=param,
            code="context_length_exceeded",
        )


async def tokenize(fn: Callable[..., T], *args: Any, param: str = "messages") -> T:
    """Run tokenization / chat-template rendering in a worker thread, off the event loop.

    An InvalidRequestError (a template error, ...) is a 400; anything else is hearth's bug: a 500.
    """
    try:
        return await asyncio.to_thread(fn, *args)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param=exc.param or param) from None


def resolve_max_tokens(
    engine: EngineClient,
    prompt_len: int,
    requested: int | None,
    param: str = "max_tokens",
    prompt_param: str = "prompt",
) -> int:
    """The request's max_tokens, or what is left of the context; 400 naming both numbers, and
    naming the prompt's field (`prompt_param`) when the prompt alone leaves no room."""
    limit = engine.info.max_model_len
    if prompt_len >= limit:
        raise context_error(limit, prompt_len, None, prompt_param)
    if requested is None:
        default = engine.info.default_sampling.get("max_tokens")
        left = limit - prompt_len
        if left < 1:
            raise context_error(limit, prompt_len, None, param)
        return min(default, left) if default else left
    if prompt_len + requested > limit:
        raise context_error(limit, prompt_len, requested, param)
    return requested
