"""Where hearth keeps files on the host (torch-free, used by the engine and the server alike)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir() -> Path:
    """$HEARTH_CACHE_DIR, else the user cache dir (~/.cache/hearth on Linux).

    Holds what can be rebuilt: GGUF conversions and repacked blocks, compiled kernels, autotune
    decisions. Not created here; writers create their own sub-folder.
    """
    root = os.environ.get("HEARTH_CACHE_DIR") or platformdirs.user_cache_dir("hearth")
    return Path(root)


def data_dir() -> Path:
    """$HEARTH_DATA_DIR, else the user data dir (~/.local/share/hearth on Linux).

    Holds what cannot be rebuilt: the stored Responses API objects, files and batches. Not
    created here.
    """
    root = os.environ.get("HEARTH_DATA_DIR") or platformdirs.user_data_dir("hearth")
    return Path(root)


def default_responses_db() -> str:
    """`hearth serve`'s default --responses-db: a SQLite file in the data dir."""
    return str(data_dir() / "responses.sqlite3")


def default_files_dir() -> str:
    """`hearth serve`'s default --files-dir: uploaded files and batches, in the data dir."""
    return str(data_dir() / "files")
