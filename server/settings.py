"""Server-wide settings that are not per-model (auth, CORS)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    base_path: str = "/v1"
