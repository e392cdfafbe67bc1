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
