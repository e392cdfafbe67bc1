"""The embedding engine: inputs of every request batched into forwards on the model's own thread.

`EmbeddingEngine.embed` tokenizes a request off the event loop (instruction prefix first, special
tokens added), checks it, and queues its inputs. The engine thread takes up to `max_num_seqs`
queued inputs (first come, first served), sorts them by length and splits them into buckets of
similar lengths (a bucket's padded tokens stay within `max_num_batched_tokens`); each bucket is
one right-padded forward under `torch.inference_mode()`, pooled and normalised (pooling.py). A
request's result goes back to its event loop once all its inputs are done. Generation models run
on their own threads: the two never wait for each other's steps.
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
from hearth.engine.embedding.pooling import PoolingConfig, finish, pool
from hearth.engine.threads import ThreadController, enabled
from hearth.engine.types import (
    EmbeddingRequest,
    EmbeddingResult,
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
class _Job:
    """One request in flight: its token ids and, filled in by the engine thread, its vectors."""

    ids: list[list[int]]
    dimensions: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[EmbeddingResult]
    vectors: list[torch.Tensor | None] = field(default_factory=list)  # [H] float32 each
    left: int = 0
    cancelled: bool = False


class EmbeddingEngine:
    """Implements engine.types.EmbeddingClient (and the EngineClient calls the server makes of
    every model) over an embedding model; generation calls are a 400 naming the model."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pooling: PoolingConfig,
        settings: EngineSettings,
        max_len: int,
        device: torch.device,
        threads: int = 0,
        max_inputs: int = 2048,
    ) -> None:
        self.info: ModelInfo
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.settings = settings
        self.max_len = max_len  # tokens per input at most
        self.device = device
        self.threads = threads  # torch intra-op threads of the engine thread (CPU); 0: as is
        self.max_inputs = max_inputs  # per request (400 beyond, in the server)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._queue: deque[tuple[_Job, int]] = deque()  # (job, input index), arrival order
        self._jobs = 0  # requests in flight
        self._running = 0  # inputs in the forward now
        self._wake = threading.Condition()
        self._stopping = False
        self._dead: str | None = None
        self.controller: ThreadController | None = None  # CPU: the team follows free cores
        self._thread = threading.Thread(target=self._run, name="hearth-embed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- EmbeddingClient ----------------------------------------------------------------------
    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The request's vectors; InvalidRequestError names `input[i]` (or the field) at fault."""
        if self._dead:
            raise EngineDeadError(self._dead)
        if request.dimensions is not None:
            self._check_dimensions(request.dimensions)
        ids = await asyncio.to_thread(self._token_ids, request)
        if self._jobs >= self.settings.max_num_seqs + self.settings.max_waiting:
            raise QueueFullError(f"{self._jobs} requests are in flight; the queue is full")
        loop = asyncio.get_running_loop()
        job = _Job(ids, request.dimensions, loop, loop.create_future(), [None] * len(ids), len(ids))
        with self._wake:
            if self._dead:
                raise EngineDeadError(self._dead)
            self._jobs += 1
            self._queue.extend((job, i) for i in range(len(ids)))
            self._wake.notify()
        try:
            return await job.future
        finally:
            job.cancelled = True  # a client that left: its queued inputs are skipped
            self._jobs -= 1

    def _check_dimensions(self, dimensions: int) -> None:
        allowed = self.pooling.matryoshka_dimensions
        if not allowed:
            raise InvalidRequestError(
                f"The model '{self.info.model_id}' does not support 'dimensions' (it is not a "
                "Matryoshka model).",
                "dimensions",
            )
        if dimensions not in allowed:
            raise InvalidRequestError(
                f"dimensions must be one of {allowed} for the model '{self.info.model_id}', got "
                f"{dimensions}.",
                "dimensions",
            )

    def _token_ids(self, request: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input (texts with their instruction prefix), checked for length."""
        if not request.inputs:
            raise InvalidRequestError("input must not be empty.", "input")
        if isinstance(request.inputs[0], str):
            prefix = self._prefix(request.prompt_name)
            for i, text in enumerate(request.inputs):
                if not text:
                    raise InvalidRequestError(f"input[{i}] is an empty string.", "input")
            texts = [prefix + str(text) for text in request.inputs]
            ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        else:
            ids = [list(map(int, row)) for row in request.inputs]
            for i, row in enumerate(ids):
                if not row:
                    raise InvalidRequestError(f"input[{i}] is an empty list of tokens.", "input")
                if not all(0 <= t < self.vocab_size for t in row):
                    raise InvalidRequestError(
                        f"input[{i}] has token ids outside the vocabulary [0, {self.vocab_size}).",
                        "input",
                    )
        for i, row in enumerate(ids):
            if len(row) > self.max_len:
                raise InvalidRequestError(
                    f"input[{i}] has {len(row)} tokens; this model's maximum input length is "
                    f"{self.max_len} tokens.",
                    "input",
                )
        return ids

    def _prefix(self, prompt_name: str | None) -> str:
        name = prompt_name or self.pooling.default_prompt_name
        if name is None:
            return ""
        if name not in self.pooling.prompts:
            known = ", ".join(sorted(self.pooling.prompts)) or "none"
            raise InvalidRequestError(
                f"Unknown prompt_name {name!r}; this model's prompts: {known}.", "prompt_name"
            )
        return self.pooling.prompts[name]

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
        return InvalidRequestError(
            f"The model '{self.info.model_id}' is an embedding model: it serves /v1/embeddings "
            "only.",
            "model",
        )

    def abort(self, request_id: str) -> None:
        """Nothing to do: a request whose caller left is skipped when its inputs come up."""

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
            self._dead = f"embedding thread died: {type(exc).__name__}: {exc}"
            log.exception("embedding thread died")
            raise
        finally:
            self._dead = self._dead or "engine is shutting down"
            self.fail_all(self._dead)
            if control is not None:
                budget().leave(control.name)

    def _take(self) -> list[tuple[_Job, int]]:
        """Up to max_num_seqs queued inputs of requests still waiting, oldest first."""
        taken: list[tuple[_Job, int]] = []
        while self._queue and len(taken) < self.settings.max_num_seqs:
            job, i = self._queue.popleft()
            if not job.cancelled and not job.future.done():
                taken.append((job, i))
        return taken

    def _buckets(self, taken: list[tuple[_Job, int]]) -> list[list[tuple[_Job, int]]]:
        """Inputs sorted by length, cut where a bucket's lengths would differ by over 2x (+8)
        or its padded tokens would pass max_num_batched_tokens (one input always fits)."""
        ordered = sorted(taken, key=lambda item: len(item[0].ids[item[1]]))
        buckets: list[list[tuple[_Job, int]]] = []
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

    def _forward(self, bucket: list[tuple[_Job, int]]) -> None:
        """One padded forward for a bucket; its vectors go to their jobs (errors fail them)."""
        rows = [job.ids[i] for job, i in bucket]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        try:
            with torch.inference_mode():
                ids, mask = ids.to(self.device), mask.to(self.device)
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
                vectors = pool(hidden, mask, self.pooling.mode).cpu()  # [B, H] float32
        except Exception as exc:  # fail these requests, keep serving the others
            log.exception("embedding forward failed")
            for job, _ in bucket:
                self._resolve(job, RuntimeError(f"engine error: {type(exc).__name__}: {exc}"))
            return
        for (job, i), vector in zip(bucket, vectors, strict=True):
            job.vectors[i] = vector
            job.left -= 1
            if job.left == 0:
                try:
                    result: EmbeddingResult | Exception = self._result(job)
                except Exception as exc:  # fail this request, never the thread (its jobs hang)
                    log.exception("embedding result failed")
                    result = RuntimeError(f"engine error: {type(exc).__name__}: {exc}")
                self._resolve(job, result)

    def _result(self, job: _Job) -> EmbeddingResult:
        stacked = torch.stack(job.vectors)  # type: ignore[arg-type]  # [N, H]
        vectors = finish(stacked, self.pooling.normalize, job.dimensions)  # [N, D]
        return EmbeddingResult(vectors.tolist(), sum(len(row) for row in job.ids))

    @staticmethod
    def _resolve(job: _Job, outcome: EmbeddingResult | BaseException) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            job.loop.call_soon_threadsafe(settle)
