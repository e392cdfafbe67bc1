"""Opening engine streams: a request's limits, deadline (a 504 once expired) and metrics, and its
outputs checked for the engine's own failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from hearth.engine.types import (
    EngineClient,
    EngineDeadError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
)
from hearth.server.errors import engine_error, output_error, timeout_error
from hearth.server.limits import Limits, check_request
from hearth.server.metrics import Metrics


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


def raise_for_output(output: GenerationOutput) -> None:
    """An output that ends its request in failure (finish_reason "error") raises its APIError."""
    if output.finish_reason == "error":
        raise output_error(output.error, output.retryable)
