"""A request's context between its route and the engine: the app's registry, metrics and limits,
response ids, and the client going away."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request

from hearth.engine.types import EngineClient, GenerationOutput, GenerationRequest
from hearth.server.limits import Limits
from hearth.server.metrics import Metrics
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from hearth.server.streams import open_stream


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
        """`open_stream` (server/streams.py) under this request's metrics and limits."""
        return await open_stream(engine, request, self.metrics, self.limits)


def new_id(prefix: str) -> str:
    sep = "_" if prefix in ("resp", "msg") else "-"
    return f"{prefix}{sep}{uuid.uuid4().hex}"


async def until_disconnected(http: Request) -> None:
    """Returns when the client has gone away (event-driven: no polling)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return
