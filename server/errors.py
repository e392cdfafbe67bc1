"""Every error leaves as OpenAI's envelope: {"error": {message, type, param, code}} + status, except
on Anthropic's routes (`/v1/messages…`), where it is Anthropic's: {"type": "error", "error":
{type, message}} with Anthropic's status and type (`envelope`, keyed on the path).

The one table from failure to HTTP status: `APIError` for the server's own checks, the builders
below for each kind of failure found on the way (context length, engine refusals, a failed
output, deadline, client gone), and the exception handlers for everything else (validation 400,
InvalidRequestError 400, any other exception 500 with a logged traceback)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hearth.engine.types import EngineDeadError, InvalidRequestError, QueueFullError

log = logging.getLogger("hearth.server")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class APIError(Exception):
    """Raised anywhere in a handler; rendered as the OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "server_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def context_error(limit: int, prompt_len: int, requested: int | None, param: str) -> APIError:
    """400: the prompt plus `requested` tokens (None: any completion) do not fit `limit`."""
    if requested is None:
        detail = f"your prompt has {prompt_len} tokens, leaving no room for a completion"
    else:
        detail = (
            f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or {param}"
        )
    return APIError(
        400,
        f"This model's maximum context length is {limit} tokens. However, {detail}.",
        param=param,
        code="context_length_exceeded",
    )


def engine_error(exc: Exception) -> APIError:
    """An engine's refusal to start a request: 429 (queue full), 503 (engine dead), else 400."""
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            f"The server is busy: {exc}. Retry shortly.",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    return APIError(400, str(exc), param=getattr(exc, "param", None))


def engine_dead(model: str) -> APIError:
    return APIError(503, f"The engine of model '{model}' has stopped.", code="engine_dead")


def output_error(message: str | None, retryable: bool) -> APIError:
    """A request the engine failed after starting it: 503 when the server is going away (another
    replica, or a retry, will do), else 500 (hearth's bug, logged by the engine)."""
    if retryable:
        return APIError(503, message or "unavailable", code="service_unavailable")
    return APIError(500, message or "engine error", code="engine_error")


def timeout_error(seconds: float) -> APIError:
    """504: the request outlived the server's request timeout (server/limits.py)."""
    return APIError(
        504,
        f"The request did not finish within the server's request timeout ({seconds:g} s).",
        code="request_timeout",
    )


def client_closed() -> APIError:
    """The 499 of a client that went away first (nginx's code; nobody reads the body)."""
    return APIError(499, "The client closed the request.", code="client_closed_request")


# pydantic names the union member a value failed as: `str`, `literal['a','b']`, `ToolDef`, ...
_UNION_TAG = re.compile(r"^(str|int|float|bool|list|dict|none)$|[\[(]|^[A-Z]\w*$")


def _param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    parts = [
        p
        for p in loc
        if p not in ("body", "query", "path", "header") and not _UNION_TAG.search(str(p))
    ]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


def _validation_message(error: dict[str, Any], param: str | None) -> str:
    if error["type"] == "json_invalid":
        return "We could not parse the JSON body of your request. It must be valid JSON."
    if error["type"] == "missing":
        return f"Missing required parameter: '{param}'."
    message = error["msg"].removeprefix("Value error, ")
    return f"Invalid value for '{param}': {message}" if param else message


# -- Anthropic's envelope (docs.anthropic.com/en/api/errors) -------------------------------------

ANTHROPIC_PATHS = ("/v1/messages",)  # routes whose errors are in Anthropic's envelope
# status -> Anthropic's error type; 503 (loading, draining, engine gone) leaves as 529 overloaded
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_ANTHROPIC_STATUS = {503: 529}


def anthropic_error(error: APIError) -> tuple[int, dict[str, Any]]:
    """`error` as Anthropic's status and body; the message names the offending field."""
    status = _ANTHROPIC_STATUS.get(error.status, error.status)
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = error.message
    if error.param and error.param not in message:
        message = f"{error.param}: {message}"
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def envelope(path: str, error: APIError) -> tuple[int, dict[str, Any]]:
    """The status and body `error` leaves with on the route at `path`."""
    if path.startswith(ANTHROPIC_PATHS):
        return anthropic_error(error)
    return error.status, error.body()


def _respond(request: Request, error: APIError) -> JSONResponse:
    status, body = envelope(request.url.path, error)
    return JSONResponse(body, status_code=status, headers=error.headers)


async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
    return _respond(request, exc)


def _cross_field_param(error: dict[str, Any], param: str | None) -> str | None:
    """A model-level check names its field (a ParamError): join it to where the model sits."""
    cause = (error.get("ctx") or {}).get("error")
    field = getattr(cause, "param", None)
    if not isinstance(field, str):
        return param
    return f"{param}.{field}" if param else field


def _deepest(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The first error, or, where a union failed on every member, the member that went deepest.

    `content: "x" | [parts]` sent a bad part fails as "not a string" and as "bad part 0"; the
    second is what the client got wrong.
    """
    first = errors[0]
    prefix = _param(tuple(first.get("loc", ())))
    same_field = [
        e for e in errors if prefix and (_param(tuple(e.get("loc", ()))) or "").startswith(prefix)
    ]
    return max(same_field or [first], key=lambda e: len(_param(tuple(e.get("loc", ()))) or ""))


def validation_error(errors: Sequence[Any]) -> APIError:
    """The 400 for pydantic's errors of a body (a route's, or a batch line's), naming the
    field of the deepest one."""
    first = _deepest(list(errors)) if errors else {"type": "value_error", "msg": "", "loc": ()}
    param = None if first["type"] == "json_invalid" else _param(tuple(first.get("loc", ())))
    param = _cross_field_param(first, param)
    message = _validation_message(first, param)
    if first["type"] == "model_attributes_type" and not param:  # no JSON body, or not an object
        param, message = None, "The request body must be a JSON object."
    return APIError(400, message, param=param)


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _respond(request, validation_error(exc.errors()))


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error = APIError(exc.status_code, str(exc.detail), headers=exc.headers)
    return _respond(request, error)


async def _on_invalid_request(request: Request, exc: InvalidRequestError) -> JSONResponse:
    """The client's to fix, wherever it surfaced (the routes catch most of them closer)."""
    return _respond(request, APIError(400, str(exc), param=exc.param))


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return _respond(request, APIError(500, f"internal error: {type(exc).__name__}"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _on_api_error)
    app.add_exception_handler(InvalidRequestError, _on_invalid_request)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)
