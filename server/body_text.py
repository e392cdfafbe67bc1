"""Text that is not valid Unicode is refused where the body is parsed, for every route at once.

JSON lets a string carry a lone UTF-16 surrogate escape (`"\\ud83d"`, half an emoji cut by a
client that split on code units). Python's `json` decodes it into a `str` that no tokenizer,
encoder or UTF-8 writer accepts, so it surfaced deep inside a route as a 500. OpenAI answers
such a body with a 400; so does hearth, before any route sees it (server.limits.RequestGuard
calls `invalid_text_param` on every body it has read).

The scan is cheap for the bodies that matter: a regex over the raw bytes finds no surrogate
escape in almost every body, and only a body that has one is parsed to name its field.
"""

from __future__ import annotations

import json
import re
from typing import Any

# a \uD800-\uDFFF escape (any case); `\\ud83d` (an escaped backslash) also matches, the walk
# below then finds the text valid
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _is_valid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _find(value: Any, path: str) -> tuple[str, bool] | None:
    """(where, is_a_key) of the first string in `value` that is not valid Unicode."""
    if isinstance(value, str):
        return None if _is_valid(value) else (path, False)
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _find(item, _join(path, i))) is not None:
                return found
    elif isinstance(value, dict):
        for key, item in value.items():
            if not _is_valid(key):
                return path, True
            if (found := _find(item, _join(path, key))) is not None:
                return found
    return None


def invalid_text_param(body: bytes) -> tuple[str | None, str] | None:
    """(param, message) when the JSON `body` holds a string (value or key) that is not valid
    Unicode; None when it has none, or is not JSON (the route's parser says so then)."""
    if not _SURROGATE_ESCAPE.search(body):
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    found = _find(parsed, "")
    if found is None:
        return None
    path, is_key = found
    what = f"a key of '{path}'" if is_key and path else "a key" if is_key else f"'{path}'"
    return path or None, (
        f"Invalid value for {what}: the text is not valid Unicode (an unpaired surrogate "
        "escape such as \\ud83d). Send whole characters."
    )
