"""Files on disk, metadata in SQLite (server/files/db.py): OpenAI's File object, listing pages.

A file's bytes are written to `blobs/<id>` (to a temporary name, then renamed) before its row is
committed, so a listed file always has its bytes; a crash in between leaves only an unlisted
temporary file. Output files of a batch get ids derived from the batch's, so writing them again
after a restart replaces them instead of adding orphans.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from hearth.server.files.db import Database

PURPOSES = ("batch",)  # what clients may upload; batch_output is the server's own
COLUMNS = "id, purpose, filename, bytes, created_at"


def file_object(row: tuple) -> dict[str, Any]:
    """OpenAI's File object of a `files` row."""
    file_id, purpose, filename, size, created_at = row
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "expires_at": None,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }


class FileStore:
    """Create, read, list and delete files (see the module docstring)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock

    def create(
        self, data: bytes, filename: str, purpose: str, file_id: str | None = None
    ) -> dict[str, Any]:
        """Store `data`; its File object. `file_id` given: replaces that file if it exists."""
        file_id = file_id or f"file-{uuid.uuid4().hex}"
        path = self.db.blobs / file_id
        partial = path.with_name(f".{file_id}.{uuid.uuid4().hex[:8]}.part")  # a writer's own
        with open(partial, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
        row = (file_id, purpose, filename, len(data), int(self.clock()))
        with self.db.transaction() as db:
            db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            db.execute(f"INSERT INTO files ({COLUMNS}) VALUES (?, ?, ?, ?, ?)", row)
        return file_object(row)

    def get(self, file_id: str) -> dict[str, Any] | None:
        rows = self.db.query(f"SELECT {COLUMNS} FROM files WHERE id = ?", (file_id,))
        return file_object(rows[0]) if rows else None

    def content(self, file_id: str) -> bytes | None:
        if self.get(file_id) is None:
            return None
        return (self.db.blobs / file_id).read_bytes()

    def delete(self, file_id: str) -> bool:
        with self.db.transaction() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if gone:  # only a listed file's name is ever a path (never a client's text)
            (self.db.blobs / file_id).unlink(missing_ok=True)
        return bool(gone)

    def page(
        self, purpose: str | None, after: str | None, limit: int, order: str
    ) -> dict[str, Any]:
        """OpenAI's list object: files by creation (`order`), after the file `after`."""
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        if after is not None:
            cmp = "<" if order == "desc" else ">"
            where.append(f"seq {cmp} COALESCE((SELECT seq FROM files WHERE id = ?), -1)")
            args.append(after)
        sql = f"SELECT {COLUMNS} FROM files"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
        rows = self.db.query(sql, (*args, limit + 1))
        data = [file_object(r) for r in rows[:limit]]
        return list_page(data, len(rows) > limit)


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: {object: list, data, first_id, last_id, has_more}."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
