"""The Batch API's shapes: the create body, the input file's lines (checked up front, as
OpenAI's validating step does) and the Batch object.

An input line is `{"custom_id", "method": "POST", "url": <the batch's endpoint>, "body"}`. A
file with a line that is not such an object (bad JSON, no custom_id, a custom_id used twice,
another method or url, a body that is not an object) fails the batch, its `errors` naming each
line (1-based). A body its route would refuse is not checked here: that line is answered with
the route's own 400 in the error file, as OpenAI does.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from hearth.server.wire import WireModel

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
MAX_LINES = 50_000  # OpenAI's limit per batch
MAX_ERRORS = 100  # errors listed for a file that fails validation
WINDOW_S = {"24h": 24 * 3600}
# statuses a batch leaves only by running on (the runner resumes them after a restart)
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
STATUSES = (*UNFINISHED, "completed", "failed", "expired", "cancelled")


class BatchRequest(WireModel):
    """POST /v1/batches."""

    input_file_id: str
    endpoint: Literal[ENDPOINTS]  # type: ignore[valid-type]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=16)

    @field_validator("metadata")
    @classmethod
    def _metadata_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, text in (value or {}).items():
            if len(key) > 64 or len(text) > 512:
                raise ValueError("keys have at most 64 characters and values at most 512")
        return value


class InputLine(WireModel):
    custom_id: str = Field(min_length=1)
    method: Literal["POST"]
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Line:
    number: int  # 1-based line of the input file
    custom_id: str
    body: dict[str, Any]


def parse_input(data: bytes, endpoint: str) -> tuple[list[Line], list[dict[str, Any]]]:
    """The file's lines, and OpenAI's error objects for the lines that are not valid requests
    (empty: the batch may run). Blank lines are skipped."""
    lines: list[Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def fail(number: int, code: str, message: str, param: str | None = None) -> None:
        if len(errors) < MAX_ERRORS:
            errors.append({"code": code, "message": message, "param": param, "line": number})

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        fail(1, "invalid_file_format", "The file is not UTF-8 text.")
        return [], errors
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = InputLine.model_validate(json.loads(raw))
        except json.JSONDecodeError:
            fail(number, "invalid_json_line", f"Line {number} is not valid JSON.")
            continue
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or None
            fail(number, "invalid_request", f"Line {number}: {first['msg']} ({field}).", field)
            continue
        if line.url != endpoint:
            message = f"Line {number} has url '{line.url}'; this batch's endpoint is {endpoint}."
            fail(number, "mismatched_endpoint", message, "url")
        elif line.custom_id in seen:
            message = f"Line {number} repeats custom_id '{line.custom_id}'."
            fail(number, "duplicate_custom_id", message, "custom_id")
        else:
            seen.add(line.custom_id)
            lines.append(Line(number, line.custom_id, line.body))
    if not lines and not errors:
        fail(1, "empty_file", "The input file has no requests.")
    if len(lines) > MAX_LINES:
        fail(MAX_LINES + 1, "too_many_requests", f"A batch holds at most {MAX_LINES} requests.")
    return lines, errors


def new_batch(batch_id: str, body: BatchRequest, now: float | None = None) -> dict[str, Any]:
    """OpenAI's Batch object of a batch just created (validating)."""
    created = int(time.time() if now is None else now)
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": body.endpoint,
        "errors": None,
        "input_file_id": body.input_file_id,
        "completion_window": body.completion_window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": created,
        "in_progress_at": None,
        "expires_at": created + WINDOW_S[body.completion_window],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": body.metadata,
    }


def moved(batch: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    """The batch in `status`, its `<status>_at` stamped now (and any other fields set)."""
    changed = {**batch, "status": status, **fields}
    if status != "validating":
        changed[f"{status}_at"] = int(time.time())
    return changed
