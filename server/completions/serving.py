"""Serving legacy text completions over one or several prompts: the response or its SSE chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from hearth.engine.types import EngineClient, GenerationOutput, GenerationRequest
from hearth.server.completions.protocol import CompletionRequest
from hearth.server.errors import APIError
from hearth.server.generation import (
    Context,
    check_text_length,
    new_id,
    open_streams,
    raise_for_output,
    resolve_max_tokens,
    run_all,
    tokenize,
    usage,
)
from hearth.server.logprobs import LogprobAligner, aligned, completion_logprobs
from hearth.server.streaming import event_stream, sse


async def _prompt_ids(engine: EngineClient, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        check_text_length(engine, len(prompt), "prompt")
        return await tokenize(engine.encode, prompt, param="prompt")
    return prompt


async def serve_completion(
    body: CompletionRequest, context: Context
) -> dict[str, Any] | StreamingResponse:
    """The text_completion object, or the stream of its chunks."""
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server.", param="suffix")
    engine = context.registry.get(body.model)
    prompts = [await _prompt_ids(engine, p) for p in body.prompts()]
    request_id = new_id("cmpl")
    requests = []
    for i, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(engine, len(ids), body.max_tokens)
        sampling = body.sampling_params(max_tokens, engine.info.default_sampling, body.logprobs)
        requests.append(GenerationRequest(f"{request_id}-{i}", ids, sampling))
    base = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "system_fingerprint": None,
    }
    echoes = [engine.decode(ids) if body.echo else "" for ids in prompts]
    prompt_tokens = sum(len(ids) for ids in prompts)
    if body.stream:
        streams = await open_streams(context, engine, requests)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        with_logprobs = body.logprobs is not None
        return event_stream(
            _chunks(
                base,
                engine,
                streams,
                body.n,
                echoes,
                prompt_tokens,
                include_usage,
                with_logprobs,
            )
        )
    results = await run_all(context, engine, requests)
    choices = []
    for p, result in enumerate(results):
        for choice in result.choices:
            logprobs = None
            if body.logprobs is not None:
                placed = aligned(
                    engine, choice.text, choice.logprobs, choice.finish_reason, len(echoes[p])
                )
                logprobs = completion_logprobs(engine, placed)
            choices.append(
                {
                    "index": p * body.n + choice.index,
                    "text": echoes[p] + choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
    completion_tokens = sum(r.completion_tokens for r in results)
    return {**base, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


async def _merge(
    streams: list[AsyncIterator[GenerationOutput]],
) -> AsyncIterator[tuple[int, GenerationOutput]]:
    """Interleave several output streams as their items arrive: (stream number, output)."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, GenerationOutput | None]] = asyncio.Queue()

    async def pump(number: int, stream: AsyncIterator[GenerationOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((number, output))
        finally:
            await queue.put((number, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            number, output = await queue.get()
            if output is None:
                remaining -= 1
                continue
            yield number, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # a stream that failed: report it
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()


async def _chunks(
    base: dict[str, Any],
    engine: EngineClient,
    streams: list[AsyncIterator[GenerationOutput]],
    n: int,
    echoes: list[str],
    prompt_tokens: int,
    include_usage: bool,
    with_logprobs: bool,
) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs: Any = None, finish: str | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    aligners: dict[int, LogprobAligner] = {}  # logprobs follow the text, offsets count it
    for p, echo in enumerate(echoes):
        for i in range(n):
            aligners[p * n + i] = LogprobAligner(engine, len(echo))
            if echo:
                yield chunk(p * n + i, echo)
    completion_tokens = 0
    async for p, output in _merge(streams):
        raise_for_output(output)
        index = p * n + output.index
        completion_tokens += len(output.token_ids)
        placed = aligners[index].feed(output.text, output.logprobs, output.finish_reason)
        logprobs = completion_logprobs(engine, placed) if with_logprobs and placed else None
        if output.text or logprobs or output.finish_reason:
            yield chunk(index, output.text, logprobs, output.finish_reason)
    if include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
