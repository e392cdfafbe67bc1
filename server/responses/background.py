"""Background responses (`background: true`): the generation runs as a task that updates the
stored response (queued, in_progress, then completed / incomplete / failed / cancelled); GET
polls it, POST .../cancel aborts it, and a streamed one's events are kept in memory so a client
can resume the stream (`GET ...?stream=true&starting_after=N`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from hearth.server.errors import APIError
from hearth.server.limits import Limits
from hearth.server.responses.store import ResponseStore
from hearth.server.settings import ServerSettings
from hearth.server.streaming import event_stream, sse

log = logging.getLogger("hearth.server")

KEPT_RUNS = 256  # finished runs whose events are kept for resuming their streams
UNFINISHED = ("queued", "in_progress")


class BackgroundRun:
    """One background response's task and, when streamed, its events so far."""

    def __init__(self, response_id: str, stream: bool) -> None:
        self.response_id = response_id
        self.stream = stream
        self.events: list[dict[str, Any]] = []  # events[n] has sequence_number n
        self.done = False
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def record(self, event: dict[str, Any]) -> None:
        if self.stream:
            self.events.append(event)
            self._notify()

    def end(self) -> None:
        self.done = True
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()  # followers wait on the new one

    async def follow(self, after: int) -> AsyncIterator[str]:
        """The events with sequence numbers above `after` as SSE, then the new ones as they
        come, until the run ends."""
        index = max(after + 1, 0)
        while True:
            while index < len(self.events):
                event = self.events[index]
                yield sse(event, event=event["type"])
                index += 1
            if self.done:
                return
            await self._wake.wait()

    async def cancel(self) -> None:
        """Cancel the task (aborting its engine request) and wait for it to end."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.end()


class BackgroundRuns:
    """The app's background runs by response id: running ones, and the last finished ones."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, BackgroundRun] = OrderedDict()

    def get(self, response_id: str) -> BackgroundRun | None:
        return self._runs.get(response_id)

    @property
    def running(self) -> int:
        return sum(not run.done for run in self._runs.values())

    def check_capacity(self, cap: int) -> None:
        """429 when `cap` background responses run already (they have a cap of their own: they
        hold no HTTP request, so nothing else would bound them)."""
        if self.running >= cap:
            raise APIError(
                429,
                f"Too many background responses are running (at most {cap}). Retry later.",
                param="background",
                code="rate_limit_exceeded",
                headers={"Retry-After": "5"},
            )

    def add(self, run: BackgroundRun) -> None:
        self._runs[run.response_id] = run
        finished = [key for key, r in self._runs.items() if r.done]
        for key in finished[: max(len(finished) - KEPT_RUNS, 0)]:
            del self._runs[key]

    async def cancel_all(self) -> None:
        for run in list(self._runs.values()):
            await run.cancel()


def run_limits(settings: ServerSettings) -> Limits:
    """A background response's limits: the server's n cap, and its own deadline from now
    (ServerSettings.background_timeout_s); past it the run is aborted and ends failed."""
    deadline = None
    if settings.background_timeout_s is not None:
        deadline = asyncio.get_running_loop().time() + settings.background_timeout_s
    return Limits(settings.max_n, deadline)


def get_runs(app: FastAPI) -> BackgroundRuns:
    runs = getattr(app.state, "background_runs", None)
    if runs is None:
        runs = app.state.background_runs = BackgroundRuns()
    return runs


def start(
    runs: BackgroundRuns,
    store: ResponseStore,
    queued: dict[str, Any],
    turns: list[dict[str, Any]],
    input_items: list[dict[str, Any]],
    events: Callable[[], Awaitable[AsyncIterator[dict[str, Any]]]],
    cancelled: Callable[[], dict[str, Any]],
    stream: bool,
) -> dict[str, Any] | StreamingResponse:
    """Store `queued` and run `events()` (the response's event sequence; its last event's
    response is stored by the caller's settle) as a task; `cancelled()` is the object a cancel
    leaves. The queued object, or (stream) the events as they come."""
    store.put(queued, turns, input_items)
    run = BackgroundRun(queued["id"], stream)

    async def work() -> None:
        try:
            async for event in await events():
                if event["type"] == "response.in_progress":
                    store.put(event["response"], turns)
                run.record(event)
        except asyncio.CancelledError:
            store.put(cancelled(), turns)
            raise
        except APIError as exc:  # the engine refused it (queue full, too long, ...)
            failed = {**queued, "status": "failed", "error": {"code": "server_error"}}
            failed["error"]["message"] = exc.message
            store.put(failed, turns)
        except Exception as exc:
            log.exception("background response failed")
            error = {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"}
            store.put({**queued, "status": "failed", "error": error}, turns)
        finally:
            run.end()

    run.task = asyncio.create_task(work(), name=f"hearth-{queued['id']}")
    runs.add(run)
    return event_stream(run.follow(-1), done=False) if stream else queued


async def cancel(store: ResponseStore, runs: BackgroundRuns, response_id: str) -> dict[str, Any]:
    """POST /v1/responses/{id}/cancel: a background response ends cancelled (if it had not
    finished); 400 for one that was not run in the background."""
    stored = store.get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id}' not found.")
    if not stored.response.get("background"):
        raise APIError(400, "Only responses created with background=true can be cancelled.")
    run = runs.get(response_id)
    if run is not None:
        await run.cancel()
    stored = store.get(response_id) or stored
    if stored.response["status"] in UNFINISHED:  # cancelled before its task ran, or orphaned
        store.put({**stored.response, "status": "cancelled"}, stored.messages)
        stored = store.get(response_id) or stored
    return stored.response


def resume(
    store: ResponseStore, runs: BackgroundRuns, response_id: str, starting_after: int | None
) -> StreamingResponse:
    """GET /v1/responses/{id}?stream=true: a background stream's events after `starting_after`
    (all of them without it), then the rest as they come."""
    if store.get(response_id) is None:
        raise APIError(404, f"Response with id '{response_id}' not found.")
    run = runs.get(response_id)
    if run is None or not run.stream:
        raise APIError(
            400,
            "Only responses created with background=true and stream=true by this server run "
            "can be streamed again.",
            param="stream",
        )
    return event_stream(run.follow(-1 if starting_after is None else starting_after), done=False)
