"""Serving legacy text completions over one or several prompts: the response or its SSE chunks.

With `echo` and `logprobs`, a choice's logprobs cover the prompt's tokens (the first with `null`
logprob and top_logprobs), then the generated ones; `text_offset` indexes the returned text, which
starts with the prompt. `max_tokens: 0` with echo scores the prompt only. A special stop token
that ended a sequence is listed last (server/logprobs.py says why), though `text` leaves it out.
Streamed, the prompt's entries (and vLLM's `prompt_logprobs`) ride on the choice's first chunk
after the echoed text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from hearth.engine.types import EngineClient, GenerationOutput, GenerationRequest, TokenLogprob
from hearth.server.collect import open_streams, run_all
from hearth.server.completions.protocol import CompletionRequest
from hearth.server.context import Context, new_id
from hearth.server.errors import APIError
from hearth.server.logprobs import (
    Aligned,
    LogprobAligner,
    aligned,
    completion_logprobs,
    prompt_aligned,
    vllm_prompt_logprobs,
)
from hearth.server.streaming import event_stream, sse
from hearth.server.streams import raise_for_output
from hearth.server.tokens import check_text_length, resolve_max_tokens, tokenize
from hearth.server.usage import usage


async def _prompt_ids(engine: EngineClient, prompt: str | list[int]) -> list[int]:
    """The prompt's tokens; an empty prompt is the start of a document (OpenAI's)."""
    if isinstance(prompt, str):
        check_text_length(engine, len(prompt), "prompt")
        prompt = await tokenize(engine.encode, prompt, param="prompt")
    if prompt:
        return prompt
    start = engine.info.document_start_id
    if start is None:
        raise APIError(400, "The prompt is empty (this model has no start token).", param="prompt")
    return [start]


async def serve_completion(
    body: CompletionRequest, context: Context
) -> dict[str, Any] | StreamingResponse:
    """The text_completion object, or the stream of its chunks."""
    if body.suffix:
        raise APIError(400, "suffix is not supported by this server.", param="suffix")
    engine = await context.registry.acquire(body.model)
    prompts = [await _prompt_ids(engine, p) for p in body.prompts()]
    request_id = new_id("cmpl")
    requests = []
    for i, ids in enumerate(prompts):
        max_tokens = resolve_max_tokens(engine, len(ids), body.max_tokens)
        sampling = body.sampling_params(max_tokens, engine.info.default_sampling, body.logprobs)
        sampling.prompt_logprobs = body.engine_prompt_logprobs
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
            _chunks(base, engine, streams, body, prompts, echoes, include_usage, with_logprobs)
        )
    results = await run_all(context, engine, requests)
    choices = []
    for p, result in enumerate(results):
        for choice in result.choices:
            logprobs = None
            if body.logprobs is not None:
                placed = aligned(
                    engine,
                    choice.text,
                    choice.logprobs,
                    choice.finish_reason,
                    len(echoes[p]),
                    keep_stop_token=True,
                )
                if body.echo:
                    placed = _echoed(engine, body, prompts[p], choice.prompt_logprobs) + placed
                logprobs = completion_logprobs(engine, placed)
            choices.append(
                {
                    "index": p * body.n + choice.index,
                    "text": echoes[p] + choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                    **_vllm_extra(engine, body, choice.prompt_logprobs),
                }
            )
    completion_tokens = sum(r.completion_tokens for r in results)
    cached_tokens = sum(r.cached_tokens for r in results)
    counts = usage(prompt_tokens, completion_tokens, cached_tokens)
    return {**base, "choices": choices, "usage": counts}


def _echoed(
    engine: EngineClient,
    body: CompletionRequest,
    prompt_ids: list[int],
    scores: list[TokenLogprob | None] | None,
) -> list[Aligned]:
    """The echoed prompt's logprob entries, placed in the choice's text."""
    return prompt_aligned(engine, prompt_ids, scores, body.logprobs or 0)


def _vllm_extra(
    engine: EngineClient, body: CompletionRequest, scores: list[TokenLogprob | None] | None
) -> dict[str, Any]:
    """vLLM's `prompt_logprobs` choice field, when the request asked for it."""
    if body.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": vllm_prompt_logprobs(engine, scores, body.prompt_logprobs)}


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
    body: CompletionRequest,
    prompts: list[list[int]],
    echoes: list[str],
    include_usage: bool,
    with_logprobs: bool,
) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    n, prompt_tokens = body.n, sum(len(ids) for ids in prompts)

    def chunk(
        index: int,
        text: str,
        logprobs: Any = None,
        finish: str | None = None,
        more: dict[str, Any] | None = None,
    ) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [{**choice, **(more or {})}], **extra})

    aligners: dict[int, LogprobAligner] = {}  # logprobs follow the text, offsets count it
    for p, echo in enumerate(echoes):
        for i in range(n):
            aligners[p * n + i] = LogprobAligner(engine, len(echo), keep_stop_token=True)
            if echo:
                yield chunk(p * n + i, echo)
    completion_tokens = 0
    cached = [0] * len(prompts)  # each prompt's tokens from the prefix cache
    async for p, output in _merge(streams):
        raise_for_output(output)
        index = p * n + output.index
        completion_tokens += len(output.token_ids)
        cached[p] = max(cached[p], output.num_cached_tokens)
        placed = aligners[index].feed(output.text, output.logprobs, output.finish_reason)
        more: dict[str, Any] = {}
        if output.prompt_logprobs is not None:  # the sample's first output
            more = _vllm_extra(engine, body, output.prompt_logprobs)
            if body.echo and with_logprobs:
                placed = _echoed(engine, body, prompts[p], output.prompt_logprobs) + placed
        logprobs = completion_logprobs(engine, placed) if with_logprobs and placed else None
        if output.text or logprobs or output.finish_reason or more:
            yield chunk(index, output.text, logprobs, output.finish_reason, more)
    if include_usage:
        counts = usage(prompt_tokens, completion_tokens, sum(cached))
        yield sse({**base, "choices": [], "usage": counts})
