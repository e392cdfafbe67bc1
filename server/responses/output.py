"""Responses API output: the response object, and its items built from text and tool calls."""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from hearth.engine.types import SamplingParams
from hearth.server.generation import new_id
from hearth.server.responses.protocol import ResponseRequest
from hearth.server.tool_parser import Event, ToolCallParser
from hearth.server.tools import Tool, call_json

StreamEvent = tuple[str, dict[str, Any]]  # (event type, its fields)


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [output_text(text)],
    }


class OutputItems:
    """Turns generated text into output items (messages and function calls), incrementally.

    feed() and finish() return the stream events for what was added; `items` holds the items
    in order. Without tools the text is one message, opened before any text arrives.
    """

    def __init__(
        self, tools: list[Tool], parser: str, *, parallel: bool = True, forced: bool = False
    ) -> None:
        self.items: list[dict[str, Any]] = []
        self._parser = (
            ToolCallParser(tools, parser, parallel=parallel, forced=forced) if tools else None
        )
        self._open: dict[str, Any] | None = None
        self.events: list[StreamEvent] = []
        if self._parser is None:
            self._open_message()

    def feed(self, text: str) -> list[StreamEvent]:
        if self._parser is None:
            self._text(text)
        else:
            for event in self._parser.feed(text):
                self._apply(event)
        return self._take()

    @property
    def done(self) -> bool:
        """parallel_tool_calls false and the one call is complete: the rest is not wanted."""
        return self._parser is not None and self._parser.done

    def finish(self, status: str = "completed") -> list[StreamEvent]:
        """Close what is open; items get `status` (incomplete when cut short)."""
        if self._parser is not None:
            for event in self._parser.finish("length" if status == "incomplete" else None):
                self._apply(event)
        self._close(status)
        if not self.items:  # nothing at all was written: one empty message
            self._open_message()
            self._close(status)
        for item in self.items:
            item["status"] = status
        return self._take()

    # -- internals ----------------------------------------------------------------------------
    def _take(self) -> list[StreamEvent]:
        events, self.events = self.events, []
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _apply(self, event: Event) -> None:
        if event[0] == "content":
            self._text(event[1])
        elif event[0] == "call":
            self._close("completed")
            call = event[2]
            item = {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
                "status": "in_progress",
            }
            self._add(item)
        else:
            self._open["arguments"] += event[2]
            self.events.append(
                ("response.function_call_arguments.delta", {**self._where(), "delta": event[2]})
            )

    def _text(self, text: str) -> None:
        if not text:
            return
        if self._open is None or self._open["type"] != "message":
            self._close("completed")
            self._open_message()
        self._open["content"][0]["text"] += text
        where = {**self._where(), "content_index": 0}
        self.events.append(("response.output_text.delta", {**where, "delta": text, "logprobs": []}))

    def _open_message(self) -> None:
        self._add(message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress"))
        where = {**self._where(), "content_index": 0}
        self.events.append(("response.content_part.added", {**where, "part": output_text("")}))

    def _add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self._open = item
        index = len(self.items) - 1
        added = {"output_index": index, "item": copy.deepcopy(item)}
        self.events.append(("response.output_item.added", added))

    def _close(self, status: str) -> None:
        item = self._open
        if item is None:
            return
        where = self._where()
        if item["type"] == "message":
            text, where = item["content"][0]["text"], {**where, "content_index": 0}
            self.events.append(
                ("response.output_text.done", {**where, "text": text, "logprobs": []})
            )
            self.events.append(("response.content_part.done", {**where, "part": output_text(text)}))
        else:
            self.events.append(
                (
                    "response.function_call_arguments.done",
                    {**where, "name": item["name"], "arguments": item["arguments"]},
                )
            )
        item["status"] = status
        done = {"output_index": where["output_index"], "item": copy.deepcopy(item)}
        self.events.append(("response.output_item.done", done))
        self._open = None


@dataclass
class Reply:
    """One response under construction: what its object echoes of the request, and ids."""

    body: ResponseRequest
    sampling: SamplingParams
    prompt_tokens: int
    id: str = field(default_factory=lambda: new_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))

    def snapshot(self, status: str, **outcome: Any) -> dict[str, Any]:
        """The response object in `status`; `outcome` overrides output, usage, error, ..."""
        body = self.body
        text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "completed_at": None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "max_tool_calls": None,
            "model": body.model,
            "output": [],
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.store is not False,
            "temperature": self.sampling.temperature,
            "text": text or {"format": {"type": "text"}},
            "tool_choice": _tool_choice(body),
            "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
            "top_p": self.sampling.top_p,
            "truncation": "disabled",
            "usage": None,
            "user": body.user,
            "metadata": body.metadata or {},
            **outcome,
        }

    def finish(
        self,
        items: OutputItems,
        finish_reason: str | None,
        output_tokens: int,
        error: str | None = None,
    ) -> tuple[dict[str, Any], list[StreamEvent]]:
        """The final object (completed, incomplete at max_output_tokens, or failed), and the
        events that close its open items (none when it failed)."""
        if error is not None or finish_reason in ("error", "abort"):
            message = error or f"generation stopped: {finish_reason}"
            status, outcome = "failed", {"error": {"code": "server_error", "message": message}}
        elif finish_reason == "length":
            status, outcome = "incomplete", {"incomplete_details": {"reason": "max_output_tokens"}}
        else:
            status, outcome = "completed", {"completed_at": int(time.time())}
        closing = items.finish("completed" if status == "completed" else "incomplete")
        response = self.snapshot(
            status,
            output=items.items,
            usage=response_usage(self.prompt_tokens, output_tokens),
            **outcome,
        )
        return response, [] if status == "failed" else closing


def _tool_choice(body: ResponseRequest) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


def assistant_turn(output: list[dict[str, Any]]) -> dict[str, Any]:
    """A response's output as the assistant message a later turn's template sees."""
    text = "".join(
        part["text"] for item in output if item["type"] == "message" for part in item["content"]
    )
    turn: dict[str, Any] = {"role": "assistant", "content": text}
    calls = [
        call_json(item["call_id"], item["name"], item["arguments"])
        for item in output
        if item["type"] == "function_call"
    ]
    if calls:
        turn["tool_calls"] = calls
    return turn
