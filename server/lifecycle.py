"""The server's life after start: serving, draining on a stop signal, then stopping the engines.

Readiness itself is the registry's state (loading -> ready -> draining); this module turns the
stop signals into it and ends the process when the requests in flight are done (torch-free).
"""

from __future__ import annotations

import logging
import time

import uvicorn

from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings

log = logging.getLogger("hearth")


class DrainingServer(uvicorn.Server):
    """On the first SIGINT/SIGTERM the registry turns to draining: /health and new requests get
    503 (the port stays open), requests in flight may finish for `drain_timeout` seconds, then
    the rest are ended with an error and hearth exits 0 (uvicorn would re-raise the signal). A
    second signal stops at once.
    """

    abort_grace = 3.0  # seconds for aborted requests to send their error and close

    def __init__(
        self,
        config: uvicorn.Config,
        registry: ModelRegistry,
        drain_timeout: float = ServerSettings.drain_timeout_s,
    ) -> None:
        super().__init__(config)
        self.registry = registry
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None
        self.aborted = False

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.registry.state = "draining"
            self.drain_deadline = time.monotonic() + self.drain_timeout
            log.info(
                "draining: %d request(s) in flight, up to %g s (signal again to stop now)",
                self.registry.in_flight,
                self.drain_timeout,
            )
        else:
            self.registry.state = "draining"
            super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()

    def drain_step(self) -> None:
        """Called every tick while draining: exit when idle, abort what is left at the deadline."""
        if self.drain_deadline is None or self.should_exit:
            return
        now = time.monotonic()
        if self.registry.in_flight == 0:
            self.should_exit = True
        elif not self.aborted and now >= self.drain_deadline:
            log.warning("drain timeout: ending %d request(s)", self.registry.in_flight)
            for engine in self.registry.engines:
                engine.fail_all("the server is shutting down")
            self.aborted = True
        elif self.aborted and now >= self.drain_deadline + self.abort_grace:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        self.drain_step()
        return await super().on_tick(counter)

    def stop(self) -> None:
        """Exit without draining (the models failed to load)."""
        self.should_exit = True

    def serve_until_stopped(self) -> None:
        """Serve until stopped, then refuse new requests and shut every engine down."""
        try:
            self.run()
        finally:
            self.registry.state = "draining"
            for engine in self.registry.engines:
                engine.shutdown()
