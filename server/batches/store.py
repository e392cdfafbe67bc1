"""Batches and their lines in SQLite (server/files/db.py): each batch's object, each input line
with its result once run. `request_counts` are counted from the lines, never kept apart from
them, so they always agree with what the output files will hold."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from hearth.server.batches.protocol import UNFINISHED, Line
from hearth.server.files.db import Database
from hearth.server.files.store import list_page


class BatchStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def create(self, batch: dict[str, Any]) -> None:
        with self.db.transaction() as db:
            db.execute(
                "INSERT INTO batches (id, status, batch) VALUES (?, ?, ?)",
                (batch["id"], batch["status"], json.dumps(batch)),
            )

    def put(
        self,
        batch: dict[str, Any],
        lines: list[Line] | None = None,
        only_from: tuple[str, ...] | None = None,
    ) -> bool:
        """Update the batch (and, once validated, add its lines in the same transaction); with
        `only_from`, only if its stored status is one of those (False: it had moved on)."""
        sql, args = "UPDATE batches SET status = ?, batch = ? WHERE id = ?", ()
        if only_from is not None:
            sql += f" AND status IN ({','.join('?' * len(only_from))})"
            args = only_from
        with self.db.transaction() as db:
            row = (batch["status"], json.dumps(batch), batch["id"], *args)
            if not db.execute(sql, row).rowcount:
                return False
            db.executemany(
                "INSERT OR IGNORE INTO batch_lines (batch_id, line, custom_id, request) "
                "VALUES (?, ?, ?, ?)",
                [(batch["id"], x.number, x.custom_id, json.dumps(x.body)) for x in lines or []],
            )
        return True

    def get(self, batch_id: str) -> dict[str, Any] | None:
        rows = self.db.query("SELECT batch FROM batches WHERE id = ?", (batch_id,))
        return self._with_counts(json.loads(rows[0][0])) if rows else None

    def page(self, after: str | None, limit: int) -> dict[str, Any]:
        """Batches, newest first, after the batch `after`."""
        sql, args = "SELECT batch FROM batches", ()
        if after is not None:
            sql += " WHERE seq < COALESCE((SELECT seq FROM batches WHERE id = ?), -1)"
            args = (after,)
        rows = self.db.query(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit + 1))
        data = [self._with_counts(json.loads(r[0])) for r in rows[:limit]]
        return list_page(data, len(rows) > limit)

    def _with_counts(self, batch: dict[str, Any]) -> dict[str, Any]:
        total, completed, failed = self.db.query(
            "SELECT COUNT(*), COALESCE(SUM(done AND NOT is_error), 0), "
            "COALESCE(SUM(done AND is_error), 0) FROM batch_lines WHERE batch_id = ?",
            (batch["id"],),
        )[0]
        batch["request_counts"] = {"total": total, "completed": completed, "failed": failed}
        return batch

    def todo(self, batch_id: str) -> list[Line]:
        """The lines not run yet, in file order."""
        rows = self.db.query(
            "SELECT line, custom_id, request FROM batch_lines WHERE batch_id = ? AND done = 0 "
            "ORDER BY line",
            (batch_id,),
        )
        return [Line(n, cid, json.loads(body)) for n, cid, body in rows]

    def finish_line(self, batch_id: str, line: int, result: dict[str, Any], error: bool) -> bool:
        """Record a line's output line, once (False: it was already done)."""
        with self.db.transaction() as db:
            return bool(
                db.execute(
                    "UPDATE batch_lines SET done = 1, is_error = ?, result = ? "
                    "WHERE batch_id = ? AND line = ? AND done = 0",
                    (int(error), json.dumps(result), batch_id, line),
                ).rowcount
            )

    def results(self, batch_id: str, error: bool) -> Iterator[str]:
        """The output (or error) file's lines, in input order."""
        rows = self.db.query(
            "SELECT result FROM batch_lines WHERE batch_id = ? AND done = 1 AND is_error = ? "
            "ORDER BY line",
            (batch_id, int(error)),
        )
        return (r[0] for r in rows)

    def unfinished(self) -> list[str]:
        marks = ",".join("?" * len(UNFINISHED))
        rows = self.db.query(
            f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY seq", UNFINISHED
        )
        return [r[0] for r in rows]

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Batches by status; lines done by outcome (completed, failed), for /metrics."""
        by_status = dict(self.db.query("SELECT status, COUNT(*) FROM batches GROUP BY status"))
        done = dict(
            self.db.query(
                "SELECT CASE is_error WHEN 1 THEN 'failed' ELSE 'completed' END, COUNT(*) "
                "FROM batch_lines WHERE done = 1 GROUP BY is_error"
            )
        )
        return by_status, done
