"""One engine thread per model, bridged to asyncio: generate() streams, abort() cancels."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hearth.engine import cores
from hearth.engine.core import EngineCore, FatalStepError
from hearth.engine.multimodal.processor import VisionProcessor
from hearth.engine.text.tokenizer import ChatTokenizer
from hearth.engine.threads import ThreadController, enabled
from hearth.engine.types import (
    EngineDeadError,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    ImageInput,
    InvalidRequestError,
    ModelInfo,
    MultiModalInputs,
    QueueFullError,
    ended_output,
)

log = logging.getLogger("hearth.engine")
# A due re-measure (autotune_noise.SlowWatch) waits for this much idleness first: clients often
# send their next request right after the last one ends, and a re-measure holds the thread.
RETUNE_AFTER_IDLE_S = 2.0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[list[GenerationOutput]]
    n: int  # samples: the stream ends after n final outputs


class AsyncEngine:
    """Implements engine.types.EngineClient over an EngineCore stepped on its own thread.

    The thread sleeps on a condition variable while there is no work, so an idle server uses no
    CPU; outputs reach each request's asyncio queue through call_soon_threadsafe, once per step.

    The core is built on the engine thread itself (`start`): kernel choice, autotune and every
    step then share one OpenMP team. On CPU a second team elsewhere in the process (a loader
    thread's) makes libgomp count more threads than CPUs and stop spin-waiting between parallel
    regions: measured on a 2-vCPU EPYC, a batch-1 step took 33 ms on a second thread against
    16 ms when the only team was the stepping thread's. Threads that load models keep torch at
    one thread (`engine.loading.loader.single_threaded`).
    """

    pace_timeout = 0.05  # seconds the engine waits for the event loop at most

    def __init__(
        self, tokenizer: ChatTokenizer, name: str, pace: bool = False, threads: int = 0
    ) -> None:
        self.core: EngineCore
        self.info: ModelInfo
        self.pace = pace
        self.threads = threads  # torch intra-op threads of the engine thread (CPU); 0: as is
        self.tokenizer = tokenizer
        self.vision: VisionProcessor | None = None  # image-text-to-text models
        self._streams: dict[str, _Stream] = {}
        self._inbox: list[tuple[str, Any]] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._dead: str | None = None
        self._built = threading.Event()
        self._build: Callable[[], EngineCore] | None = None
        self._build_error: BaseException | None = None
        self.controller: ThreadController | None = None  # CPU: the team follows free cores
        self._thread = threading.Thread(
            target=self._main, name=f"hearth-engine:{name}", daemon=True
        )

    # -- EngineClient -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> list[int]:
        return self.tokenizer.encode_chat(messages, tools, template_kwargs)

    def encode_chat_mm(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        template_kwargs: dict[str, Any] | None,
        images: Sequence[ImageInput],
    ) -> tuple[list[int], MultiModalInputs]:
        if self.vision is None:
            raise InvalidRequestError(f"model {self.info.model_id!r} reads text only", "messages")
        return self.vision.encode_chat(messages, tools, template_kwargs, images)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def token_pieces(self, token_ids: Sequence[int]) -> list[tuple[bytes, bool]]:
        return self.tokenizer.token_pieces(token_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream the request's outputs; closing the iterator early aborts the request."""
        if self._dead:
            raise EngineDeadError(self._dead)
        self.core.check_request(request)  # InvalidRequestError now, before anything is queued
        if len(self._streams) >= self.core.settings.max_num_seqs + self.core.settings.max_waiting:
            raise QueueFullError(f"{len(self._streams)} requests are in flight; the queue is full")
        if request.sampling.grammar is not None:  # compile (cached) off the loop and the engine
            await asyncio.to_thread(self.core.grammars.compile, request.sampling.grammar)
        rid = request.request_id
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already running")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), request.sampling.n)
        self._streams[rid] = stream
        try:
            self._submit("add", request)
        except EngineDeadError:
            self._streams.pop(rid, None)
            raise
        remaining = request.sampling.n
        try:
            while remaining > 0:
                for output in await stream.queue.get():
                    if output.finished:
                        remaining -= 1
                    yield output
        finally:
            self._streams.pop(rid, None)
            if remaining > 0:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._submit("abort", request_id)

    # -- LoRA adapters (engine/lora/) --------------------------------------------------------
    async def load_lora(self, name: str, source: str) -> None:
        """Read, check and register adapter `name` from `source` (a PEFT directory or a cached
        hub id) on a worker thread: generation goes on meanwhile. AdapterError (a 400) if it
        cannot be served; nothing is registered then."""
        await asyncio.to_thread(self.core.loras.load, name, source)

    def unload_lora(self, name: str) -> bool:
        """Forget adapter `name` (False: not loaded); the caller has waited for its requests."""
        return self.core.loras.unregister(name)

    def fail_all(self, message: str) -> None:
        """End every request in flight with a retryable error (a drain that ran out of time)."""
        self._submit("fail_all", message)

    def stats(self) -> EngineStats:
        stats = self.core.stats()
        if self.controller is not None:
            stats.cpu_threads = self.controller.threads
        return stats

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def start(self, build: Callable[[], EngineCore]) -> EngineCore:
        """Start the engine thread, which sets its torch thread count, runs `build` (the core:
        kernels, autotune, KV cache) and then steps; returns the core, or raises what `build`
        raised (the thread has then ended)."""
        self._build = build
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        return self.core

    def _main(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            self.core = self._build()
        except BaseException as exc:
            self._build_error = exc
            self._built.set()
            return
        if self.threads and enabled():
            runner = self.core.runner
            self.controller = ThreadController(
                self._thread.name,
                self.threads,
                runner.kernels.threads or self.threads,
                torch.set_num_threads,
                cores.budget(),
                getattr(runner, "thread_times", None),
            )
        self._built.set()
        self._run()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- engine thread ----------------------------------------------------------------------
    def _submit(self, kind: str, payload: Any) -> None:
        with self._wake:
            if self._dead is not None and kind == "add":  # nothing would ever answer it
                raise EngineDeadError(self._dead)
            self._inbox.append((kind, payload))
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._inbox or self._stopping or self.core.has_unfinished()):
                        if self.core.runner.retune_due:  # re-measure outside the lock, once
                            if not self._wake.wait(RETUNE_AFTER_IDLE_S):  # quiet that long
                                break
                            continue  # work (or a spurious wake-up): look again
                        self._wake.wait()
                    if self._stopping:
                        break
                    commands, self._inbox = self._inbox, []
                if not commands and not self.core.has_unfinished():
                    # the only way here without work: a re-measure is due; a request or a
                    # shutdown ends it (read without the lock: a stale answer costs one step)
                    self.core.idle(lambda: self._stopping or bool(self._inbox))
                    continue
                outputs = self._apply(commands)
                if self.core.has_unfinished():
                    try:
                        if self.controller is not None:
                            self.controller.before_step()
                        started = time.perf_counter()
                        outputs += self.core.step()
                        if self.controller is not None:
                            seconds = time.perf_counter() - started
                            self.controller.after_step(seconds, self.core.last_step_tokens)
                    except FatalStepError:
                        raise
                    except Exception as exc:  # fail the affected requests, keep serving
                        log.exception("engine step failed")
                        outputs += self.core.fail_all(f"engine error: {type(exc).__name__}: {exc}")
                self._dispatch(outputs)
        except BaseException as exc:
            with self._wake:
                self._dead = f"engine thread died: {type(exc).__name__}: {exc}"
            log.exception("engine thread died")
            raise
        finally:
            with self._wake:
                self._dead = self._dead or "engine is shutting down"
                self._inbox = []
            outputs = self.core.fail_all(self._dead)
            ended = {o.request_id for o in outputs}
            for rid, stream in list(self._streams.items()):  # queued or mid-apply: end them too
                if rid not in ended:
                    outputs += _failed(rid, stream.n, 0, self._dead)
            self._dispatch(outputs)
            if self.controller is not None:
                cores.budget().leave(self.controller.name)
            self.core.runner.close()  # tensor-parallel followers stop too

    def _apply(self, commands: list[tuple[str, Any]]) -> list[GenerationOutput]:
        outputs: list[GenerationOutput] = []
        for kind, payload in commands:
            if kind == "abort":
                outputs += self.core.abort(payload)
            elif kind == "fail_all":
                outputs += self.core.fail_all(payload, retryable=True)
            else:
                try:
                    self.core.add_request(payload)
                except Exception as exc:  # a bad request fails alone; the thread goes on
                    if not isinstance(exc, InvalidRequestError):
                        log.exception("adding request %s failed", payload.request_id)
                    n, prompt_len = payload.sampling.n, len(payload.prompt_token_ids)
                    outputs += _failed(payload.request_id, n, prompt_len, str(exc))
        return outputs

    def _dispatch(self, outputs: list[GenerationOutput]) -> None:
        """Hand a step's outputs to the event loops: one thread-safe call per loop per step.

        With `pace` set (CPU), the engine then waits until the loop has run the woken requests
        (up to their next await) before stepping again: on a machine with few cores, Python work
        on the server thread during a forward stalls torch's threads far more than it costs.
        """
        per_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                per_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in per_loop.items():
            done = threading.Event() if self.pace else None
            try:
                loop.call_soon_threadsafe(self._deliver, loop, items, done)
            except RuntimeError:  # the loop is closed
                continue
            if done is not None:
                done.wait(self.pace_timeout)

    @staticmethod
    def _deliver(
        loop: asyncio.AbstractEventLoop, items: list, done: threading.Event | None
    ) -> None:
        batches: dict[int, tuple[asyncio.Queue, list[GenerationOutput]]] = {}
        for queue, output in items:
            batches.setdefault(id(queue), (queue, []))[1].append(output)
        for queue, batch in batches.values():
            queue.put_nowait(batch)
        if done is not None:  # runs after the tasks just woken have had their turn
            loop.call_soon(done.set)


def _failed(request_id: str, n: int, prompt_len: int, message: str) -> list[GenerationOutput]:
    """One final error output per sample, so that every stream of the request ends."""
    return [ended_output(request_id, i, "error", message, prompt_len) for i in range(n)]
