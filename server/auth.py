"""Optional API keys, compared in constant time; keys are never logged.

A key is sent as `Authorization: Bearer <key>` (OpenAI's clients) or as `x-api-key: <key>`
(Anthropic's); either is accepted on every route."""

from __future__ import annotations

import hmac

from fastapi import Request

from hearth.server.errors import APIError


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    found = False
    for key in keys:  # compare against every key so timing does not reveal which one matched
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


async def require_api_key(request: Request) -> None:
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        token = request.headers.get("x-api-key", "")
    if not token.strip():
        raise APIError(
            401,
            "You didn't provide an API key. Send 'Authorization: Bearer <key>' or "
            "'x-api-key: <key>'.",
            code="invalid_api_key",
        )
    if not _matches(token.strip(), keys):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
