"""The engine thread of models without a KV cache: rows of every request batched into forwards.

`BatchedEngine.submit` queues a request's rows (token-id lists, tokenized and checked by the
subclass off the event loop). The engine thread takes up to `max_num_seqs` queued rows (first
come, first served), sorts them by length and splits them into buckets of similar lengths (a
bucket's padded tokens stay within `max_num_batched_tokens`); each bucket is one right-padded
forward (the subclass's `_forward_rows`). A request's result goes back to its event loop once all
its rows are done. Generation models run on their own threads: the two never wait for each other.

Subclasses: engine/embedding/engine.py (`embed`), engine/rerank/engine.py (`rerank`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hearth.engine.config import EngineSettings
from hearth.engine.cores import budget
from hearth.engine.threads import ThreadController, enabled
from hearth.engine.types import (
    EngineDeadError,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    QueueFullError,
)

log = logging.getLogger("hearth.engine")


@dataclass
class Job:
    """One request in flight: its rows' token ids, what the subclass needs to finish it
    (`extra`), and, filled in by the engine thread, one output per row."""

    ids: list[list[int]]
    extra: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    outputs: list[Any] = field(default_factory=list)
    left: int = 0
    cancelled: bool = False


def padded(
    rows: Sequence[Sequence[int]], pad: int, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids [B, T] (T: the longest row) and the attention mask [B, T] (1: real tokens);
    right-padded, or left-padded (every row's last token at T - 1)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for r, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, span] = torch.tensor(row, dtype=torch.long)
        mask[r, span] = 1
    return ids, mask


class BatchedEngine:
    """The batching thread and the EngineClient calls the server makes of every model; generation
    calls are a 400 naming the model. Subclasses set `thread_name` and `serves` (the routes, for
    messages) and implement `_forward_rows` and `_finish`."""

    thread_name = "hearth-batched"
    serves = "/v1/embeddings"

    def __init__(
        self,
        tokenizer: Any,
        settings: EngineSettings,
        max_len: int,
        device: torch.device,
        threads: int = 0,
        max_inputs: int = 2048,
    ) -> None:
        self.info: ModelInfo
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_len = max_len  # tokens per row at most
        self.device = device
        self.threads = threads  # torch intra-op threads of the engine thread (CPU); 0: as is
        self.max_inputs = max_inputs  # per request (400 beyond, in the server)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._queue: deque[tuple[Job, int]] = deque()  # (job, row index), arrival order
        self._jobs = 0  # requests in flight
        self._running = 0  # rows in the forward now
        self._wake = threading.Condition()
        self._stopping = False
        self._dead: str | None = None
        self.controller: ThreadController | None = None  # CPU: the team follows free cores
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- for subclasses -----------------------------------------------------------------------
    def _forward_rows(self, bucket: list[tuple[Job, int]]) -> list[Any]:
        """One output per (job, row index) of `bucket` (on the CPU), from one padded forward of
        those rows (`job.ids[i]`), under `torch.inference_mode()`."""
        raise NotImplementedError

    def _finish(self, job: Job) -> Any:
        """The request's result from its rows' outputs (job.outputs, in row order)."""
        raise NotImplementedError

    def _check_alive(self) -> None:
        if self._dead:
            raise EngineDeadError(self._dead)

    async def submit(self, ids: list[list[int]], extra: Any = None) -> Any:
        """Queue a request's rows; its result (`_finish`) once every row is done. A caller that
        leaves (cancellation) has its queued rows skipped."""
        self._check_alive()
        if self._jobs >= self.settings.max_num_seqs + self.settings.max_waiting:
            raise QueueFullError(f"{self._jobs} requests are in flight; the queue is full")
        loop = asyncio.get_running_loop()
        job = Job(ids, extra, loop, loop.create_future(), [None] * len(ids), len(ids))
        with self._wake:
            self._check_alive()
            self._jobs += 1
            self._queue.extend((job, i) for i in range(len(ids)))
            self._wake.notify()
        try:
            return await job.future
        finally:
            job.cancelled = True  # a client that left: its queued rows are skipped
            self._jobs -= 1

    # -- EngineClient (what the server calls of every model) ----------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        raise self._not_generation()

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def token_pieces(self, token_ids: Sequence[int]) -> list[tuple[bytes, bool]]:
        special = set(self.tokenizer.all_special_ids)
        return [(self.tokenizer.decode([t]).encode(), t in special) for t in token_ids]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        raise self._not_generation()
        yield  # an async generator, as EngineClient's

    def _not_generation(self) -> InvalidRequestError:
        kind = {"embed": "an embedding", "rerank": "a rerank"}.get(self.info.task, "a")
        return InvalidRequestError(
            f"The model '{self.info.model_id}' is {kind} model: it serves {self.serves} only.",
            "model",
        )

    def abort(self, request_id: str) -> None:
        """Nothing to do: a request whose caller left is skipped when its rows come up."""

    def fail_all(self, message: str) -> None:
        with self._wake:
            jobs = {id(job): job for job, _ in self._queue}
            self._queue.clear()
        for job in jobs.values():
            self._resolve(job, EngineDeadError(message))

    def stats(self) -> EngineStats:
        threads = self.controller.threads if self.controller is not None else 0
        return EngineStats(self._running, len(self._queue), 0, 0, cpu_threads=threads)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        control = None  # CPU: the team follows free cores and shares them with other engines
        if self.threads and enabled():
            name, threads = self._thread.name, self.threads
            control = ThreadController(name, threads, threads, torch.set_num_threads, budget())
            self.controller = control
        try:
            while True:
                with self._wake:
                    while not (self._queue or self._stopping):
                        self._wake.wait()
                    if self._stopping:
                        break
                    taken = self._take()
                self._running = len(taken)
                try:
                    for bucket in self._buckets(taken):
                        if control is not None:
                            control.before_step()
                        started = time.perf_counter()
                        self._forward(bucket)
                        if control is not None:  # tokens: the bucket's padded size
                            longest = max(len(job.ids[i]) for job, i in bucket)
                            control.after_step(time.perf_counter() - started, len(bucket) * longest)
                finally:
                    self._running = 0
        except BaseException as exc:
            self._dead = f"{self.info.task} thread died: {type(exc).__name__}: {exc}"
            log.exception("%s thread died", self.info.task)
            raise
        finally:
            self._dead = self._dead or "engine is shutting down"
            self.fail_all(self._dead)
            if control is not None:
                budget().leave(control.name)

    def _take(self) -> list[tuple[Job, int]]:
        """Up to max_num_seqs queued rows of requests still waiting, oldest first."""
        taken: list[tuple[Job, int]] = []
        while self._queue and len(taken) < self.settings.max_num_seqs:
            job, i = self._queue.popleft()
            if not job.cancelled and not job.future.done():
                taken.append((job, i))
        return taken

    def _buckets(self, taken: list[tuple[Job, int]]) -> list[list[tuple[Job, int]]]:
        """Rows sorted by length, cut where a bucket's lengths would differ by over 2x (+8)
        or its padded tokens would pass max_num_batched_tokens (one row always fits)."""
        ordered = sorted(taken, key=lambda item: len(item[0].ids[item[1]]))
        buckets: list[list[tuple[Job, int]]] = []
        for item in ordered:
            length = len(item[0].ids[item[1]])
            if buckets:
                bucket = buckets[-1]
                shortest = len(bucket[0][0].ids[bucket[0][1]])
                padded = length * (len(bucket) + 1)
                if length <= 2 * shortest + 8 and padded <= self.settings.max_num_batched_tokens:
                    bucket.append(item)
                    continue
            buckets.append([item])
        return buckets

    def _forward(self, bucket: list[tuple[Job, int]]) -> None:
        """One padded forward for a bucket; its outputs go to their jobs (errors fail them)."""
        try:
            with torch.inference_mode():
                outputs = self._forward_rows(bucket)
        except Exception as exc:  # fail these requests, keep serving the others
            log.exception("%s forward failed", self.info.task)
            for job, _ in bucket:
                self._resolve(job, RuntimeError(f"engine error: {type(exc).__name__}: {exc}"))
            return
        for (job, i), output in zip(bucket, outputs, strict=True):
            job.outputs[i] = output
            job.left -= 1
            if job.left == 0:
                try:
                    result = self._finish(job)
                except Exception as exc:  # fail this request, never the thread (its jobs hang)
                    log.exception("%s result failed", self.info.task)
                    result = RuntimeError(f"engine error: {type(exc).__name__}: {exc}")
                self._resolve(job, result)

    @staticmethod
    def _resolve(job: Job, outcome: Any) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            job.loop.call_soon_threadsafe(settle)
