"""The engine-client glue features share: tokenizing off the loop, length checks, streams (with
their limits, deadline and metrics), disconnects.

Longer than ~300 lines on purpose: it is one request's life between the route and the engine
(open, expire, collect, close), which every feature shares; split, it would scatter that life.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from hearth.engine.types import (
    EngineClient,
    EngineDeadError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    MultiModalInputs,
    QueueFullError,
    SamplingParams,
    TokenLogprob,
)
from hearth.server.errors import APIError
from hearth.server.limits import Limits, check_request, timeout_error
from hearth.server.metrics import Metrics
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    """What serving one request needs besides its body; the route passes it to serving."""

    http: Request  # its disconnect aborts a request that is not streamed
    registry: ModelRegistry
    metrics: Metrics | None = None
    limits: Limits | None = None  # None: unlimited

    @property
    def settings(self) -> ServerSettings:
        """The server's settings (defaults outside an app)."""
        app = getattr(self.http, "app", None)
        return getattr(getattr(app, "state", None), "settings", None) or ServerSettings()

    @classmethod
    def of(cls, http: Request) -> Context:
        """The context of a request that went through the app (see limits.RequestGuard)."""
        state = http.app.state
        return cls(
            http,
            state.registry,
            getattr(state, "metrics", None),
            getattr(http.state, "limits", None),
        )

    async def open_stream(
        self, engine: EngineClient, request: GenerationRequest
    ) -> AsyncIterator[GenerationOutput]:
        """`open_stream` under this request's metrics and limits."""
        return await open_stream(engine, request, self.metrics, self.limits)


def new_id(prefix: str) -> str:
    sep = "_" if prefix == "resp" else "-"
    return f"{prefix}{sep}{uuid.uuid4().hex}"


def context_error(limit: int, prompt_len: int, requested: int | None, param: str) -> APIError:
    if requested is None:
        detail = f"your prompt has {prompt_len} tokens, leaving no room for a completion"
    else:
        detail = (
            f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or {param}"
        )
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, {detail}.",
        param=param,
        code="context_length_exceeded",
    )


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


def engine_error(exc: Exception) -> APIError:
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"The server is busy: {exc}. Retry shortly.",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    return APIError(400, str(exc), param=getattr(exc, "param", None))


async def open_stream(
    engine: EngineClient,
    request: GenerationRequest,
    metrics: Metrics | None = None,
    limits: Limits | None = None,
) -> AsyncIterator[GenerationOutput]:
    """Start generating; engine rejections surface here as APIErrors, before any byte is sent.

    The returned iterator yields every output; closing it (client gone) aborts the request. Past
    the request's deadline (see server.limits) the engine request is aborted and the iterator
    raises a 504 APIError (an error event once streaming). This is where a request's metrics are
    recorded: prompt tokens and time to first token here, inter-token latency as outputs arrive,
    generated tokens once the engine has sent its last output.
    """
    deadline = check_request(request, limits)
    expiry = _Expiry(engine, request.request_id, deadline)
    stream = engine.generate(request)
    start = time.perf_counter()
    try:
        first = await anext(stream)
        expiry.check(first)
    except StopAsyncIteration:
        first = None
    except (InvalidRequestError, QueueFullError, EngineDeadError) as exc:
        expiry.cancel()
        raise engine_error(exc) from None
    except BaseException:
        expiry.cancel()
        await stream.aclose()
        raise
    model = engine.info.model_id
    if metrics is not None:
        metrics.request_started(model, len(request.prompt_token_ids))
        metrics.first_token(model, time.perf_counter() - start)

    async def outputs() -> AsyncIterator[GenerationOutput]:
        last = time.perf_counter()
        tokens = 0
        try:
            if first is not None:
                tokens += len(first.token_ids)
                yield first
            async for output in stream:
                expiry.check(output)
                tokens += len(output.token_ids)
                if metrics is not None and output.token_ids:
                    now = time.perf_counter()
                    metrics.inter_token(model, now - last, len(output.token_ids))
                    last = now
                yield output
            if metrics is not None:
                metrics.request_finished(model, tokens)
        finally:
            expiry.cancel()
            await stream.aclose()

    return outputs()


class _Expiry:
    """A timer that aborts the engine request at its deadline; its abort becomes a 504."""

    def __init__(self, engine: EngineClient, request_id: str, deadline: float | None) -> None:
        self.expired = False
        self.timer: asyncio.TimerHandle | None = None
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self.seconds = max(0.0, deadline - loop.time())
            self.timer = loop.call_at(deadline, self._expire, engine, request_id)

    def _expire(self, engine: EngineClient, request_id: str) -> None:
        self.expired = True
        engine.abort(request_id)

    def check(self, output: GenerationOutput) -> None:
        if self.expired and output.finish_reason == "abort":
            raise timeout_error(self.seconds)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's chat / completions usage; `cached_tokens` (prompt tokens from the prefix cache)
    is always reported, 0 included, as OpenAI does."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def raise_for_output(output: GenerationOutput) -> None:
    if output.finish_reason != "error":
        return
    if output.retryable:  # the server is going away: another replica (or a retry) will do
        raise APIError(503, output.error or "unavailable", code="service_unavailable")
    raise APIError(500, output.error or "engine error", code="engine_error")


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


def client_closed() -> APIError:
    """The 499 of a client that went away first (nginx's code; nobody reads the body)."""
    return APIError(499, "The client closed the request.", code="client_closed_request")


async def until_disconnected(http: Request) -> None:
    """Returns when the client has gone away (event-driven: no polling)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


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
