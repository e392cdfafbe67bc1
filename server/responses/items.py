"""A request's input items as the store keeps them (each with an id), item_reference resolution,
and the input_items list (paginated like OpenAI's)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import TypeAdapter, ValidationError

from hearth.server.errors import APIError
from hearth.server.responses.protocol import InputItem, InputMessage, ItemReference
from hearth.server.responses.store import ResponseStore

ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}
_ITEM = TypeAdapter(InputItem)


def stored_items(items: list[Any]) -> list[dict[str, Any]]:
    """The input items as input_items lists them: each with an id (a new one if it had none)."""
    stored = []
    for item in items:
        data = item.model_dump(exclude_none=True)
        if isinstance(item, InputMessage):
            data["status"] = "completed"
        if not isinstance(data.get("id"), str):
            data = {"id": f"{ID_PREFIXES[data['type']]}_{uuid.uuid4().hex}", **data}
        stored.append(data)
    return stored


def resolve_references(items: list[Any], store: ResponseStore) -> list[Any]:
    """The input with each item_reference replaced by the stored item it names (an input or an
    output of a stored response); 404 naming input[i].id when there is none (as for an unknown
    previous_response_id)."""
    resolved = []
    for i, item in enumerate(items):
        if not isinstance(item, ItemReference):
            resolved.append(item)
            continue
        found = store.find_item(item.id)
        if found is None:
            message = f"Item with id '{item.id}' not found."
            raise APIError(404, message, param=f"input[{i}].id", code="item_not_found")
        try:
            resolved.append(_ITEM.validate_python(found))
        except ValidationError:
            raise APIError(
                400, f"Item '{item.id}' cannot be used as input.", param=f"input[{i}].id"
            ) from None
    return resolved


def page(
    items: list[dict[str, Any]],
    after: str | None,
    limit: int,
    order: Literal["asc", "desc"],
) -> dict[str, Any]:
    """OpenAI's list object of `items` in `order`, the `limit` after the item `after`."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item.get("id") for item in ordered]
        if after not in ids:
            raise APIError(400, f"No input item with id '{after}'.", param="after")
        ordered = ordered[ids.index(after) + 1 :]
    data = ordered[:limit]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": len(ordered) > limit,
    }
