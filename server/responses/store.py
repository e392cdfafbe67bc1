"""A bounded, expiring in-memory store of Responses API objects and their conversations."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as GET /v1/responses/{id} returns it
    messages: list[dict[str, Any]]  # the conversation through its output, as template messages
    expires_at: float


class ResponseStore:
    """At most `max_size` responses, each kept `ttl_s` seconds; the oldest go first.

    Every method runs without awaiting, so one event loop needs no lock.
    """

    def __init__(
        self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size = max_size
        self.ttl_s = ttl_s
        self.clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        self._evict_expired()
        return len(self._entries)

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        if self.max_size <= 0:
            return
        self._evict_expired()
        expires_at = self.clock() + self.ttl_s
        self._entries[response["id"]] = StoredResponse(response, messages, expires_at)
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        self._evict_expired()
        return self._entries.get(response_id)

    def pop(self, response_id: str) -> StoredResponse | None:
        self._evict_expired()
        return self._entries.pop(response_id, None)

    def _evict_expired(self) -> None:
        # Entries are kept in insertion order with one TTL, so the expired ones lead.
        now = self.clock()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                return
            self._entries.popitem(last=False)


def get_store(app: FastAPI) -> ResponseStore:
    """The app's store, created on first use from its ServerSettings."""
    store = getattr(app.state, "response_store", None)
    if store is None:
        settings = app.state.settings
        store = ResponseStore(settings.responses_max_stored, settings.responses_ttl_s)
        app.state.response_store = store
    return store
