"""The SQLite database of files and batches: one file in the files folder, WAL mode, one
connection behind a lock (shared by server/files/store.py and server/batches/store.py).

Schema (versioned with PRAGMA user_version, migrated forward on open): `files` (metadata; the
bytes are in the folder's `blobs/`), `batches` (each batch's object as JSON), `batch_lines`
(one row per input line: its custom_id and, once run, its output line and whether it is an
error). A line's result is written in the same transaction that marks it done, so a restart
finds each line either done with its output or not started: none twice, none lost.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hearth.server.sqlite_schema import migrate

SCHEMA_VERSION = 1
MIGRATIONS: dict[int, str] = {
    0: """
    CREATE TABLE files (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE batches (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        batch TEXT NOT NULL
    );
    CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
        line INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        request TEXT NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        is_error INTEGER NOT NULL DEFAULT 0,
        result TEXT,
        PRIMARY KEY (batch_id, line)
    );
    CREATE INDEX batch_lines_todo ON batch_lines (batch_id, done);
    """,
}


class StorageError(Exception):
    """The files database or folder cannot be opened or used."""


class Database:
    """The connection and its lock; `transaction()` is BEGIN IMMEDIATE ... COMMIT."""

    def __init__(self, folder: Path, timeout_s: float = 5.0) -> None:
        self.folder = folder
        self.blobs = folder / "blobs"
        path = folder / "index.sqlite3"
        try:
            self.blobs.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(
                path, timeout=timeout_s, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"--files-dir {folder}: cannot open: {exc}") from None
        self.lock = threading.RLock()
        try:
            self._migrate()
        except sqlite3.Error as exc:
            self.db.close()
            raise StorageError(f"--files-dir {folder}: {exc}") from None

    def _migrate(self) -> None:
        db = self.db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        with self.transaction():
            migrate(db, MIGRATIONS, SCHEMA_VERSION)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock:
            return self.db.execute(sql, args).fetchall()

    def close(self) -> None:
        with self.lock:
            self.db.close()


def open_database(files_dir: str) -> Database:
    """The database in `files_dir`; ':memory:' (apps built in-process): a temporary folder,
    removed with the process."""
    if files_dir == ":memory:":
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="hearth-files-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return Database(Path(folder))
    return Database(Path(files_dir))
