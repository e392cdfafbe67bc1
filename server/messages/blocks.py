"""A reply's content blocks, built one way for both wires: the non-streamed `content` and the
stream's content_block_start / _delta / _stop events come from the same `Blocks`, so the SDK's
accumulated stream equals the non-streamed message.

Events (Anthropic's streaming reference): a block opens with `content_block_start` (its empty
shape: `text: ""`, `thinking: ""`, `tool_use` with `input: {}`), grows by
`content_block_delta` (`text_delta`, `thinking_delta`, `input_json_delta` with `partial_json`),
and closes with `content_block_stop`. A change of kind closes the open block. hearth signs no
thinking: its `signature` is "".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from hearth.engine.types import EngineClient
from hearth.server.tool_parser import Event
from hearth.server.tools import ToolCall

Events = list[dict[str, Any]]


def tool_use_id(call: ToolCall) -> str:
    """Anthropic's id style (`toolu_…`) for a parsed call."""
    return "toolu_" + call.id.removeprefix("call_")


def _input(arguments: str) -> Any:
    """A call's arguments as its `input` ({} when empty or cut short before valid JSON)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Blocks:
    """The blocks so far (`content`) and, from each method, the events that built them."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self.calls = 0
        self._open: str | None = None
        self._json = ""  # the open tool_use block's arguments so far

    def _start(self, block: dict[str, Any]) -> Events:
        events = self.close()
        self.content.append(block)
        self._open, self._json = block["type"], ""
        start = {**block, "input": {}} if block["type"] == "tool_use" else dict(block)
        index = len(self.content) - 1
        return [*events, {"type": "content_block_start", "index": index, "content_block": start}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def thinking(self, text: str) -> Events:
        if not text:
            return []
        events = (
            []
            if self._open == "thinking"
            else self._start({"type": "thinking", "thinking": "", "signature": ""})
        )
        self.content[-1]["thinking"] += text
        return [*events, self._delta({"type": "thinking_delta", "thinking": text})]

    def text(self, text: str) -> Events:
        if not text:
            return []
        events = [] if self._open == "text" else self._start({"type": "text", "text": ""})
        self.content[-1]["text"] += text
        return [*events, self._delta({"type": "text_delta", "text": text})]

    def call(self, call: ToolCall) -> Events:
        self.calls += 1
        return self._start({"type": "tool_use", "id": tool_use_id(call), "name": call.name})

    def arguments(self, text: str) -> Events:
        if not text or self._open != "tool_use":
            return []
        self._json += text
        return [self._delta({"type": "input_json_delta", "partial_json": text})]

    def answer(self, events: Sequence[Event]) -> Events:
        """The tool-call parser's events (server/tool_parser.py) as block events."""
        out: Events = []
        for event in events:
            if event[0] == "content":
                out += self.text(event[1])
            elif event[0] == "call":
                out += self.call(event[2])
            else:
                out += self.arguments(event[2])
        return out

    def close(self) -> Events:
        """Close the open block, if any (a tool_use block's `input` is parsed now)."""
        if self._open is None:
            return []
        if self._open == "tool_use":
            self.content[-1]["input"] = _input(self._json)
        self._open = None
        return [{"type": "content_block_stop", "index": len(self.content) - 1}]


def matched_stop(
    engine: EngineClient, text: str, token_ids: Sequence[int], stops: Sequence[str]
) -> str | None:
    """Which stop sequence ended a sample whose finish_reason is "stop" (None: end of turn).

    The engine cuts the text before the stop string it met but keeps its tokens, so the tokens'
    text holds the stop string at (about) where the text ends; the earliest one found there is
    the one met. A sample that ended on an end-of-turn token has none there.
    """
    if not stops:
        return None
    full = engine.decode(list(token_ids))
    start = max(0, len(text) - 8)  # decoding the whole may differ slightly at the seams
    found = [(full.find(stop, start), stop) for stop in stops]
    found = [(at, stop) for at, stop in found if at >= 0]
    return min(found)[1] if found else None


def stop_reason(finish: str | None, calls: int, stop: str | None) -> str:
    """Anthropic's stop_reason from the engine's finish reason and what the reply holds."""
    if finish == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop is not None else "end_turn"


def ending(finish: str | None, calls: int, stop: str | None) -> dict[str, Any]:
    """The message's (and message_delta's) stop fields; `stop_details` is for refusals: null."""
    reason = stop_reason(finish, calls, stop)
    return {"stop_reason": reason, "stop_sequence": stop, "stop_details": None}
