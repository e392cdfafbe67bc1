"""POST /v1/responses, GET|DELETE /v1/responses/{id} (OpenAI's Responses API)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
