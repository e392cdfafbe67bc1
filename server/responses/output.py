"""Responses API output items built from generated text: reasoning, messages and function calls
(the response object around them is in reply.py)."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from hearth.engine.types import FinishReason, TokenLogprob
from hearth.server.responses.reasoning_items import (
    Reasoning,
    StreamEvent,
    close_events,
    delta_event,
    output_reasoning,
    reasoning_item,
    with_reasoning,
)
from hearth.server.responses.text_logprobs import TextLogprobs
from hearth.server.tool_parser import Event, ToolCallParser
from hearth.server.tools import Tool, call_json


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_usage(
    input_tokens: int, output_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0
) -> dict[str, Any]:
    """Responses' usage; `cached_tokens`: input tokens served from the prefix cache."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
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
    """Turns generated text into output items (reasoning, messages and function calls),
    incrementally.

    feed() and finish() return the stream events for what was added; `items` holds the items
    in order. With `reasoning`, the thinking is split off first and becomes one `reasoning`
    item ahead of the rest (none when there is no reasoning text); tool calls are parsed in
    the answer only. Without tools the answer is one message, opened before any text arrives
    (after the reasoning, when the model may think).
    """

    def __init__(
        self,
        tools: list[Tool],
        parser: str,
        *,
        parallel: bool = True,
        forced: bool = False,
        reasoning: Reasoning | None = None,
        logprobs: TextLogprobs | None = None,
    ) -> None:
        self.items: list[dict[str, Any]] = []
        self.logprobs = logprobs  # include message.output_text.logprobs: the text's entries
        self._parser = (
            ToolCallParser(tools, parser, parallel=parallel, forced=forced) if tools else None
        )
        self.reasoning = reasoning if reasoning and reasoning.parser.enabled else None
        self._open: dict[str, Any] | None = None
        self.events: list[StreamEvent] = []
        if self._parser is None and self.reasoning is None:
            self._open_message()

    @property
    def reasoning_tokens(self) -> int:
        return self.reasoning.tokens if self.reasoning else 0

    def feed(
        self,
        text: str,
        num_tokens: int = 0,
        entries: list[TokenLogprob] | None = None,
        finish: FinishReason | None = None,
    ) -> list[StreamEvent]:
        """Add `text` (`num_tokens` tokens, counted as reasoning tokens when they are; `entries`
        their logprobs, `finish` the output's finish reason)."""
        raw = text
        if self.reasoning is not None:
            split = self.reasoning.split(text, num_tokens)
            self._reason(split.reasoning)
            text = split.content
        if self.logprobs is not None:
            self.logprobs.feed(raw, text, entries, finish)
        self._answer(text)
        return self._take()

    @property
    def done(self) -> bool:
        """parallel_tool_calls false and the one call is complete: the rest is not wanted."""
        return self._parser is not None and self._parser.done

    def finish(self, status: str = "completed") -> list[StreamEvent]:
        """Close what is open; items get `status` (incomplete when cut short)."""
        if self.reasoning is not None:
            split = self.reasoning.finish()
            self._reason(split.reasoning)
            self._answer(split.content)
        if self._parser is not None:
            for event in self._parser.finish("length" if status == "incomplete" else None):
                self._apply(event)
        self._close(status)
        if all(item["type"] == "reasoning" for item in self.items):  # no answer: an empty one
            self._open_message()
            self._close(status)
        for item in self.items:
            item["status"] = status
        return self._take()

    # -- internals ----------------------------------------------------------------------------
    def _take(self) -> list[StreamEvent]:
        events, self.events = self.events, []
        return events

    def _answer(self, text: str) -> None:
        if self._parser is None:
            self._text(text)
        else:
            for event in self._parser.feed(text):
                self._apply(event)

    def _reason(self, text: str) -> None:
        """Reasoning text: the first item (it comes before any answer)."""
        if not text:
            return
        if self._open is None or self._open["type"] != "reasoning":
            self._close("completed")
            self._add(reasoning_item())
        self._open["content"][0]["text"] += text
        self.events.append(delta_event(self._open, len(self.items) - 1, text))

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _apply(self, event: Event) -> None:
        if event[0] == "content":
            self._text(event[1])
        elif event[0] == "call":
            if self.logprobs is not None:
                self.logprobs.drop()
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
        logprobs = self.logprobs.take() if self.logprobs is not None else []
        self._open["content"][0]["logprobs"] += logprobs
        where = {**self._where(), "content_index": 0}
        delta = {**where, "delta": text, "logprobs": logprobs}
        self.events.append(("response.output_text.delta", delta))

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
            part, where = item["content"][0], {**where, "content_index": 0}
            text, logprobs = part["text"], part["logprobs"]
            self.events.append(
                ("response.output_text.done", {**where, "text": text, "logprobs": logprobs})
            )
            done = {**where, "part": copy.deepcopy(part)}
            self.events.append(("response.content_part.done", done))
        elif item["type"] == "reasoning":
            summary = self.reasoning is not None and self.reasoning.summary
            self.events += close_events(item, where["output_index"], summary)
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
    with_reasoning(turn, output_reasoning(output))
    return turn
