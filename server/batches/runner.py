"""Running batches: each unfinished batch is an asyncio task in the server's loop.

validating (the input file's lines checked, then stored with the batch in one transaction) ->
in_progress (its lines run, at most `batch_max_in_flight` lines of all batches at once, each
at `batch_priority`; each answer stored in the same transaction that marks its line done) ->
finalizing (the output and error files written from the stored answers; stored before they
are, so a cancel then is refused and only one finalize ever runs) -> completed.

Durable: a restarted server resumes every batch it finds unfinished. Lines already done keep
their answer; the others (never started, or cut off mid-run) run again, and an answer cut off
before its transaction was never stored: no line twice, none lost. A line the shutdown (or a
stopped engine) fails is not answered either (lines.py `Retry`). A shutdown only cancels the
tasks (the status stays, for the next start); a cancel (POST .../cancel) cancels the batch's
lines (their engine requests are aborted, which frees their KV blocks), then the lines never run
become error lines (`batch_cancelled`) and the batch ends cancelled; past its completion window
it ends expired the same way (`batch_expired`), through finalizing with `expired_at` set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from functools import partial
from typing import Any

from fastapi import FastAPI

from hearth.server.batches.lines import Retry, run_line
from hearth.server.batches.protocol import Line, moved, parse_input
from hearth.server.batches.store import BatchStore
from hearth.server.files.store import FileStore

log = logging.getLogger("hearth.server")
CANCELLABLE = ("validating", "in_progress")
LEFT_OVER = {
    "cancelled": ("batch_cancelled", "The batch was cancelled before this request ran."),
    "expired": ("batch_expired", "The batch's completion window ended before this request ran."),
}


class BatchRunner:
    def __init__(
        self, app: FastAPI, files: FileStore, store: BatchStore, priority: int, max_in_flight: int
    ) -> None:
        self.app = app
        self.files = files
        self.store = store
        self.priority = priority
        self.max_in_flight = max(1, max_in_flight)
        self.in_flight = 0  # lines running now, all batches
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._slots: asyncio.Semaphore | None = None

    def start(self, batch_id: str) -> None:
        task = asyncio.create_task(self._run(batch_id), name=f"hearth-{batch_id}")
        self.tasks[batch_id] = task
        task.add_done_callback(partial(self._forget, batch_id))

    def _forget(self, batch_id: str, task: asyncio.Task[None]) -> None:
        if self.tasks.get(batch_id) is task:
            del self.tasks[batch_id]

    def counts(self) -> tuple[dict[str, int], dict[str, int], int]:
        """For /metrics: batches by status, lines done by outcome, lines in flight now."""
        return (*self.store.counts(), self.in_flight)

    def resume_all(self) -> None:
        for batch_id in self.store.unfinished():
            log.info("resuming %s", batch_id)
            self.start(batch_id)

    async def cancel(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Mark the batch cancelling, stop its lines, then end it cancelled (in the background,
        as OpenAI's: the object returned is `cancelling`). A batch no longer cancellable (it
        moved on meanwhile, say to finalizing) is returned as it is, and left running."""
        if not self.store.put(moved(batch, "cancelling"), only_from=CANCELLABLE):
            return self.store.get(batch["id"]) or batch
        task = self.tasks.get(batch["id"])
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        self.start(batch["id"])
        return self.store.get(batch["id"]) or batch

    async def close(self) -> None:
        """Shutdown: cancel every task; statuses stay, and the next start resumes them."""
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._slots = None  # bound to this loop; an app started again runs in another

    async def _run(self, batch_id: str) -> None:
        batch = self.store.get(batch_id)
        if batch is None:
            return
        try:
            if batch["status"] == "validating":
                validated = await self._validate(batch)
                if validated is None:  # cancelled meanwhile: the cancel's own task ends it
                    return
                batch = validated
            if batch["status"] == "in_progress":
                ended = not await self._run_lines(batch)  # the completion window ended
                batch = self.store.get(batch_id) or batch
                # stored before the files are written: no longer cancellable, one finalize
                expired = {"expired_at": int(time.time())} if ended else {}
                batch = moved(batch, "finalizing", **expired)
                self.store.put(batch)
            if batch["status"] in ("finalizing", "cancelling"):
                await asyncio.to_thread(self._finalize, batch, _final(batch))  # files: off the loop
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch %s failed", batch_id)
            error = {"code": "server_error", "message": f"{type(exc).__name__}: {exc}"}
            error |= {"param": None, "line": None}
            self.store.put(moved(batch, "failed", errors={"object": "list", "data": [error]}))

    async def _validate(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        data = await asyncio.to_thread(self.files.content, batch["input_file_id"])
        if data is None:
            error = {"code": "invalid_file", "message": "The input file was deleted."}
            lines, errors = [], [{**error, "param": "input_file_id", "line": None}]
        else:
            lines, errors = await asyncio.to_thread(parse_input, data, batch["endpoint"])
        if errors:
            batch = moved(batch, "failed", errors={"object": "list", "data": errors})
            self.store.put(batch)
        else:
            batch = moved(batch, "in_progress")
            # up to 50k rows: off the loop; only if still validating (a cancel meanwhile wins)
            if not await asyncio.to_thread(self.store.put, batch, lines, ("validating",)):
                return None
        return batch

    async def _run_lines(self, batch: dict[str, Any]) -> bool:
        """Run the lines not done yet; False when the completion window ended first."""
        todo = deque(self.store.todo(batch["id"]))
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_in_flight)
        workers = [
            asyncio.create_task(self._worker(batch, todo))
            for _ in range(min(self.max_in_flight, len(todo)))
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*workers, return_exceptions=True)
        return not todo

    async def _worker(self, batch: dict[str, Any], todo: deque[Line]) -> None:
        assert self._slots is not None
        registry = self.app.state.registry
        while todo and time.time() < batch["expires_at"]:
            line = todo.popleft()
            async with self._slots:
                self.in_flight += 1
                try:
                    while True:
                        while registry.state != "ready":  # loading, or draining to stop
                            await asyncio.sleep(0.5)
                        if time.time() >= batch["expires_at"]:  # never answered in time
                            todo.appendleft(line)
                            return
                        try:
                            result, error = await run_line(
                                self.app,
                                batch["endpoint"],
                                line.custom_id,
                                line.body,
                                self.priority,
                            )
                            break
                        except Retry as retry:
                            await asyncio.sleep(retry.after_s)
                    self.store.finish_line(batch["id"], line.number, result, error)
                finally:
                    self.in_flight -= 1

    def _finalize(self, batch: dict[str, Any], status: str) -> None:
        """Lines never run become error lines (cancelled, expired); the output and error files
        are written (ids derived from the batch's: a rerun replaces them); the batch ends."""
        if status in LEFT_OVER:
            code, message = LEFT_OVER[status]
            for line in self.store.todo(batch["id"]):
                result = {
                    "id": f"batch_req_{batch['id']}_{line.number}",
                    "custom_id": line.custom_id,
                    "response": None,
                    "error": {"code": code, "message": message},
                }
                self.store.finish_line(batch["id"], line.number, result, True)
        ids: dict[str, str | None] = {}
        for kind, error in (("output", False), ("error", True)):
            lines = list(self.store.results(batch["id"], error))
            ids[f"{kind}_file_id"] = None
            if lines:
                data = ("\n".join(lines) + "\n").encode()
                name, file_id = f"{batch['id']}_{kind}.jsonl", f"file-{batch['id']}-{kind}"
                ids[f"{kind}_file_id"] = self.files.create(data, name, "batch_output", file_id)[
                    "id"
                ]
        self.store.put(moved(batch, status, **ids))


def _final(batch: dict[str, Any]) -> str:
    """The status a finalizing (or cancelling) batch ends in."""
    if batch["status"] == "cancelling":
        return "cancelled"
    return "expired" if batch.get("expired_at") else "completed"
