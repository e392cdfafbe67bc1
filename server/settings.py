"""Server-wide settings that are not per-model (auth, CORS, the Responses store)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    responses_max_stored: int = 1000  # stored responses kept for previous_response_id / GET
    responses_ttl_s: float = 3600.0  # and for how long
