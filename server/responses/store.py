"""Where Responses API objects, their conversations and input items are kept: the store
interface, its in-memory backend, and the choice of backend from the settings.

A backend keeps at most `max_size` responses, each `ttl_s` seconds after it was first put (the
oldest go first). Methods are synchronous and cheap (SQLite writes are sub-millisecond in WAL
mode), so routes call them directly; another backend (e.g. PostgreSQL behind a URL) implements
`ResponseStore` and is chosen in `open_store`, without touching the routes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from fastapi import FastAPI

from hearth.server.settings import ServerSettings


class StoreError(Exception):
    """The store cannot be opened or used (corrupt, locked, unwritable, unknown URL)."""


@dataclass(frozen=True)
class StoredResponse:
    response: dict[str, Any]  # the response object as GET /v1/responses/{id} returns it
    messages: list[dict[str, Any]]  # the conversation through its output, as template messages
    expires_at: float
    input_items: list[dict[str, Any]] = field(default_factory=list)  # as input_items lists them


class ResponseStore(Protocol):
    """A backend of stored responses (see the module docstring)."""

    def put(
        self,
        response: dict[str, Any],
        messages: list[dict[str, Any]],
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        """Keep (or update: same place and expiry) a response; `input_items` None keeps them."""

    def get(self, response_id: str) -> StoredResponse | None: ...

    def pop(self, response_id: str) -> StoredResponse | None: ...

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """A stored input or output item by its id (for item_reference)."""

    def close(self) -> None: ...


def item_ids(stored: StoredResponse) -> dict[str, dict[str, Any]]:
    """A stored response's input and output items by id."""
    items = [*stored.input_items, *stored.response.get("output", [])]
    return {item["id"]: item for item in items if isinstance(item.get("id"), str)}


class MemoryResponseStore:
    """The `:memory:` backend: lost on restart. One event loop needs no lock."""

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

    def put(
        self,
        response: dict[str, Any],
        messages: list[dict[str, Any]],
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        if self.max_size <= 0:
            return
        self._evict_expired()
        old = self._entries.get(response["id"])
        if old is not None:  # an update (a background response): same place, same expiry
            items = old.input_items if input_items is None else input_items
            self._entries[response["id"]] = replace(
                old, response=response, messages=messages, input_items=items
            )
            return
        expires_at = self.clock() + self.ttl_s
        stored = StoredResponse(response, messages, expires_at, input_items or [])
        self._entries[response["id"]] = stored
        while len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        self._evict_expired()
        return self._entries.get(response_id)

    def pop(self, response_id: str) -> StoredResponse | None:
        self._evict_expired()
        return self._entries.pop(response_id, None)

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        self._evict_expired()
        for stored in reversed(self._entries.values()):
            item = item_ids(stored).get(item_id)
            if item is not None:
                return item
        return None

    def close(self) -> None:
        """Nothing to release (the entries stay for an app started again, as in tests)."""

    def _evict_expired(self) -> None:
        # Entries are kept in insertion order with one TTL, so the expired ones lead.
        now = self.clock()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if oldest.expires_at > now:
                return
            self._entries.popitem(last=False)


def open_store(settings: ServerSettings) -> ResponseStore:
    """The backend `settings.responses_db` names: `:memory:`, a SQLite file path or a
    `sqlite:///PATH` URL; StoreError (one line) if it cannot be opened."""
    url = settings.responses_db
    size, ttl = settings.responses_max_stored, settings.responses_ttl_s
    if url == ":memory:":
        return MemoryResponseStore(size, ttl)
    if url.startswith("sqlite:///"):
        url = url.removeprefix("sqlite:///") or ":memory:"
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise StoreError(
            f"--responses-db: no '{scheme}' backend (use a file path, sqlite:///PATH or :memory:)"
        )
    from hearth.server.responses.sqlite_store import SqliteResponseStore

    return SqliteResponseStore(url, size, ttl)


def get_store(app: FastAPI) -> ResponseStore:
    """The app's store (create_app opens it; created here for apps built without one)."""
    store = getattr(app.state, "response_store", None)
    if store is None:
        store = open_store(app.state.settings)
        app.state.response_store = store
    return store
