"""The SQLite backend of the Responses store: one file, WAL mode, one writer connection.

Schema (versioned with PRAGMA user_version, migrated forward on open): `responses` holds each
response, its conversation and its input items as JSON columns, in insertion order (`seq`) with
an absolute expiry (wall clock, so it survives a restart); `items` indexes every input and output
item by id for item_reference. Responses left queued or in progress by a server that stopped are
marked failed on open. A corrupt, locked or unwritable database raises StoreError at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hearth.server.responses.store import StoredResponse, StoreError, item_ids
from hearth.server.sqlite_schema import migrate

SCHEMA_VERSION = 1
# MIGRATIONS[v]: the statements that take a version-v database to version v + 1.
MIGRATIONS: dict[int, str] = {
    0: """
    CREATE TABLE responses (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        expires_at REAL NOT NULL,
        response TEXT NOT NULL,
        messages TEXT NOT NULL,
        input_items TEXT NOT NULL
    );
    CREATE INDEX responses_expiry ON responses (expires_at);
    CREATE TABLE items (
        id TEXT PRIMARY KEY,
        response_id TEXT NOT NULL REFERENCES responses (id) ON DELETE CASCADE,
        item TEXT NOT NULL
    );
    CREATE INDEX items_response ON items (response_id);
    """,
}
UNFINISHED = ("queued", "in_progress")


class SqliteResponseStore:
    """A ResponseStore in a SQLite file (see the module docstring); thread-safe (one lock)."""

    def __init__(
        self,
        path: str,
        max_size: int,
        ttl_s: float,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 5.0,
    ) -> None:
        self.path = path
        self.max_size = max_size
        self.ttl_s = ttl_s
        self.clock = clock
        self._lock = threading.Lock()
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"--responses-db {path}: cannot open: {exc}") from None
        try:
            self._open()
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"--responses-db {path}: {exc}") from None

    def _open(self) -> None:
        db = self._db
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal" and self.path != ":memory:":
            raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode is {mode})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("BEGIN IMMEDIATE")  # fails now, not later, if another writer holds it
        try:
            migrate(db, MIGRATIONS, SCHEMA_VERSION)
            self._fail_unfinished()
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _fail_unfinished(self) -> None:
        """Responses a stopped server left queued or in progress: failed (nothing runs them)."""
        marks = ",".join("?" * len(UNFINISHED))
        rows = self._db.execute(
            f"SELECT id, response FROM responses WHERE status IN ({marks})", UNFINISHED
        ).fetchall()
        for response_id, text in rows:
            response = json.loads(text)
            response["status"] = "failed"
            response["error"] = {"code": "server_error", "message": "the server stopped"}
            self._db.execute(
                "UPDATE responses SET status = 'failed', response = ? WHERE id = ?",
                (json.dumps(response), response_id),
            )

    def _evict(self) -> None:
        """Expired responses, then the oldest past max_size; never one still queued or in
        progress (its background task would lose it and polling would 404)."""
        marks = ",".join("?" * len(UNFINISHED))
        self._db.execute(
            f"DELETE FROM responses WHERE expires_at <= ? AND status NOT IN ({marks})",
            (self.clock(), *UNFINISHED),
        )
        self._db.execute(
            f"DELETE FROM responses WHERE status NOT IN ({marks}) AND seq <= "
            "(SELECT seq FROM responses ORDER BY seq DESC LIMIT 1 OFFSET ?)",
            (*UNFINISHED, self.max_size),
        )

    def __len__(self) -> int:
        with self._lock:
            now = self.clock()
            return self._db.execute(
                "SELECT COUNT(*) FROM responses WHERE expires_at > ?", (now,)
            ).fetchone()[0]

    def put(
        self,
        response: dict[str, Any],
        messages: list[dict[str, Any]],
        input_items: list[dict[str, Any]] | None = None,
    ) -> None:
        if self.max_size <= 0:
            return
        with self._lock, self._transaction():
            db = self._db
            row = db.execute(
                "SELECT input_items FROM responses WHERE id = ?", (response["id"],)
            ).fetchone()
            if input_items is None:
                input_items = json.loads(row[0]) if row else []
            values = (response["status"], json.dumps(response), json.dumps(messages))
            if row is None:
                self._evict()
                db.execute(
                    "INSERT INTO responses (id, status, expires_at, response, messages, "
                    "input_items) VALUES (?, ?, ?, ?, ?, ?)",
                    (response["id"], values[0], self.clock() + self.ttl_s, *values[1:], "[]"),
                )
            else:  # an update (a background response): same place, same expiry
                db.execute(
                    "UPDATE responses SET status = ?, response = ?, messages = ? WHERE id = ?",
                    (*values, response["id"]),
                )
            db.execute(
                "UPDATE responses SET input_items = ? WHERE id = ?",
                (json.dumps(input_items), response["id"]),
            )
            db.execute("DELETE FROM items WHERE response_id = ?", (response["id"],))
            stored = StoredResponse(response, messages, 0.0, input_items)
            db.executemany(
                "INSERT OR IGNORE INTO items (id, response_id, item) VALUES (?, ?, ?)",
                [(i, response["id"], json.dumps(item)) for i, item in item_ids(stored).items()],
            )
            self._evict()

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response, messages, expires_at, input_items FROM responses "
                "WHERE id = ? AND expires_at > ?",
                (response_id, self.clock()),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(json.loads(row[0]), json.loads(row[1]), row[2], json.loads(row[3]))

    def pop(self, response_id: str) -> StoredResponse | None:
        stored = self.get(response_id)
        if stored is not None:
            with self._lock, self._transaction():
                self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return stored

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT items.item FROM items JOIN responses ON responses.id = items.response_id "
                "WHERE items.id = ? AND responses.expires_at > ?",
                (item_id, self.clock()),
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db, self.path)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); sqlite3 errors become StoreError."""

    def __init__(self, db: sqlite3.Connection, path: str) -> None:
        self.db = db
        self.path = path

    def __enter__(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise StoreError(f"responses store {self.path}: {exc}") from None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> None:
        if kind is None:
            self.db.execute("COMMIT")
            return
        self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise StoreError(f"responses store {self.path}: {exc}") from None
