"""A user's JSON Schema placed inside a larger one keeps its references resolvable.

A tool's `parameters` (what `openai.pydantic_function_tool` emits for nested models) refers to
its own definitions with root-relative pointers: `{"$ref": "#/$defs/Step"}`, the older
`#/definitions/Step`, or `#` itself for a recursive type. Nested at `/properties/arguments` of a
call's schema, those pointers would resolve against the call, where nothing lives. Every place
that nests a user schema (server/tools.py's call grammar: forced, named and allowed tools, chat
and Responses alike) goes through `nest_schema`, which rewrites each local pointer to the place
the schema now sits at.
"""

from __future__ import annotations

from typing import Any


def _escape(segment: str) -> str:
    """A JSON Pointer segment (RFC 6901): `~` and `/` escaped."""
    return segment.replace("~", "~0").replace("/", "~1")


def pointer(*segments: str) -> str:
    """The JSON Pointer of a path: pointer("properties", "arguments") == "/properties/arguments"."""
    return "".join(f"/{_escape(s)}" for s in segments)


def _rewrite(value: Any, prefix: str) -> Any:
    if isinstance(value, list):
        return [_rewrite(item, prefix) for item in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key == "$ref" and isinstance(item, str) and item.startswith("#"):
            fragment = item[1:]
            # `#/...` is a pointer from the root; `#name` an anchor, valid wherever it sits
            out[key] = (
                f"#{prefix}{fragment}" if fragment == "" or fragment.startswith("/") else item
            )
        elif key in ("const", "enum", "default", "examples"):
            out[key] = item  # values, not schemas: a `$ref` key inside them is data
        else:
            out[key] = _rewrite(item, prefix)
    return out


def nest_schema(schema: dict[str, Any], at: str) -> dict[str, Any]:
    """`schema` rewritten to sit at JSON Pointer `at` of another schema (a copy; the caller's
    stays as sent): every local `$ref` (`#`, `#/$defs/...`, `#/definitions/...`, any pointer)
    is prefixed with `at`, so it names the same subschema as before."""
    return _rewrite(schema, at)
