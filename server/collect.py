"""Running requests to the end: outputs gathered into choices, early ends (parallel_tool_calls
false), and a client that leaves first aborting them all."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hearth.engine.types import (
    EngineClient,
    GenerationOutput,
    GenerationRequest,
    MultiModalInputs,
    SamplingParams,
    TokenLogprob,
)
from hearth.server.context import Context, until_disconnected
from hearth.server.errors import client_closed
from hearth.server.streams import raise_for_output
from hearth.server.usage import usage


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # asked for: the first output's
    cached_tokens: int = 0  # prompt tokens the prefix cache served (GenerationOutput's)


@dataclass
class Completed:
    prompt_tokens: int
    choices: list[Choice]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (the best of the choices' admissions)."""
        return max((c.cached_tokens for c in self.choices), default=0)

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


EndsEarly = Callable[[str], bool]
"""Fed one choice's output text as it comes; true once the rest of that choice is not wanted
(parallel_tool_calls false and its one call complete)."""


async def collect(
    outputs: AsyncIterator[GenerationOutput],
    n: int,
    prompt_len: int,
    ends_early: Callable[[], EndsEarly] | None = None,
) -> Completed:
    """Gather a request's outputs into its `n` choices. `ends_early` makes one watcher per
    choice: a choice it ends gets finish_reason "stop", and once every choice has ended the
    stream is closed, which aborts the request (as the streamed routes do)."""
    choices = [Choice(i) for i in range(n)]
    watchers = [ends_early() for _ in range(n)] if ends_early else []
    ended = 0
    async for output in outputs:
        raise_for_output(output)
        choice = choices[output.index]
        if choice.finish_reason is not None:
            continue  # ended early: the rest is not wanted
        choice.text += output.text
        choice.token_ids += output.token_ids
        choice.cached_tokens = max(choice.cached_tokens, output.num_cached_tokens)
        if output.logprobs:
            choice.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            choice.prompt_logprobs = output.prompt_logprobs
        if output.finish_reason is not None:
            choice.finish_reason = output.finish_reason
        elif watchers and watchers[output.index](output.text):
            choice.finish_reason = "stop"
        if watchers and choice.finish_reason is not None:
            ended += 1
            if ended == n:
                await outputs.aclose()  # a no-op when finished; aborts the request otherwise
                break
    return Completed(prompt_len, choices)


async def open_streams(
    context: Context, engine: EngineClient, requests: list[GenerationRequest]
) -> list[AsyncIterator[GenerationOutput]]:
    """Open every request's stream, or none: a refusal closes the ones already open."""
    streams: list[AsyncIterator[GenerationOutput]] = []
    try:
        for request in requests:
            streams.append(await context.open_stream(engine, request))
    except BaseException:
        for stream in streams:
            await stream.aclose()
        raise
    return streams


async def run_all(
    context: Context,
    engine: EngineClient,
    requests: list[GenerationRequest],
    ends_early: Callable[[], EndsEarly] | None = None,
) -> list[Completed]:
    """Run requests to the end (or until `ends_early`, see collect); a client that disconnects
    first aborts them all at once."""
    streams = await open_streams(context, engine, requests)
    work = asyncio.ensure_future(
        asyncio.gather(
            *(
                collect(stream, r.sampling.n, len(r.prompt_token_ids), ends_early)
                for stream, r in zip(streams, requests, strict=True)
            )
        )
    )
    watcher = asyncio.ensure_future(until_disconnected(context.http))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():  # the client left (or we are cancelled): abort, free the KV blocks
            work.cancel()
            # a cancelled gather ends with CancelledError as its *exception*, not as cancelled()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if not work.done() or work.cancelled() or isinstance(work.exception(), asyncio.CancelledError):
        raise client_closed()
    return work.result()


async def run_to_completion(
    context: Context,
    engine: EngineClient,
    request_id: str,
    prompt_ids: list[int],
    sampling: SamplingParams,
    ends_early: Callable[[], EndsEarly] | None = None,
    images: MultiModalInputs | None = None,
) -> Completed:
    """Run one request to the end (see run_all); `images`: a vision prompt's."""
    request = GenerationRequest(request_id, prompt_ids, sampling, images)
    [result] = await run_all(context, engine, [request], ends_early)
    return result
