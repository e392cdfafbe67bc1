"""A SQLite database's schema, versioned with PRAGMA user_version and migrated forward on open
(the Responses store, the files and batches database)."""

from __future__ import annotations

import sqlite3


def migrate(db: sqlite3.Connection, migrations: dict[int, str], version: int) -> None:
    """Run `migrations[v]` for each v from the file's version up to `version` (inside the
    caller's transaction); DatabaseError for a file made by a newer hearth."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    if found > version:
        raise sqlite3.DatabaseError(
            f"schema version {found} is newer than this hearth's ({version})"
        )
    for v in range(found, version):
        for statement in migrations[v].split(";"):
            if statement.strip():
                db.execute(statement)
    db.execute(f"PRAGMA user_version={version}")
