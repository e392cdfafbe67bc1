"""The streaming tool-call parser: splits model output into content and calls as it arrives."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, Literal

from hearth.server.reasoning import ReasoningParser
from hearth.server.tools import HERMES_CLOSE, HERMES_OPEN, Tool, ToolCall

PYTHON_TAG = "<|python_tag|>"
# The head of a call object once its name is known: {"name": "fn", "arguments": ...
_CALL_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


Event = (
    tuple[Literal["content"], str]
    | tuple[Literal["call"], int, ToolCall]
    | tuple[Literal["arguments"], int, str]
)


def _json_value_end(text: str, start: int, state: list[Any]) -> int | None:
    """Scan a JSON value from `start`; the index just past its end, or None if it goes on.

    `state` ([depth, in_string, escaped, begun]) carries the scan across calls.
    """
    depth, in_string, escaped, begun = state
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 0:
                    state[:] = [depth, in_string, escaped, begun]
                    return i + 1
        elif ch == '"':
            in_string, begun = True, True
        elif ch in "{[":
            depth, begun = depth + 1, True
        elif ch in "}]":
            if depth == 0:  # closes the enclosing call object: a bare value ended before it
                state[:] = [0, False, False, begun]
                return i
            depth -= 1
            if depth == 0:
                state[:] = [0, False, False, begun]
                return i + 1
        elif not ch.isspace():
            begun = True
            if depth == 0 and ch == ",":  # a bare number or literal ended
                state[:] = [depth, in_string, escaped, begun]
                return i
    state[:] = [depth, in_string, escaped, begun]
    return None


class ToolCallParser:
    """Splits model output into content and tool calls, incrementally.

    Hermes format: calls are `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks
    anywhere in the text; a call's id and name are sent once its name is known, then its
    arguments as they arrive. Llama 3 JSON format: the whole output is the call object(s), so it is
    held until the end. Text is a call only in that format and naming a function offered;
    anything else stays content.

    Call markup never becomes content: a possible start of `<tool_call>` is held until it is
    known not to be one, and an unfinished block that has named no function yet is dropped at
    the end, as is a held start when the output was cut by length. A call whose name was
    already sent keeps the arguments written so far (as OpenAI's length-cut calls do).
    `parallel=False` keeps the first call only: once it is complete, `done` is true and later
    text (calls and content alike) is dropped. `forced` (tool_choice required or a named one:
    the grammar makes the output a call) sends no content at all. `dropped` says whether
    anything was withheld.
    """

    def __init__(
        self, tools: Sequence[Tool], parser: str, *, parallel: bool = True, forced: bool = False
    ) -> None:
        self.names = {tool.name for tool in tools}
        self.parser = parser
        self.parallel, self.forced = parallel, forced
        self.done = False  # parallel=False and the first call is complete: the rest is dropped
        self.dropped = False
        self.calls: list[ToolCall] = []
        self._buffer = ""
        self._space = ""  # whitespace held back: dropped between and after calls
        self._in_call = False
        self._whole = parser == "llama3_json"  # undecided whether the output is a call
        self._args_at: int | None = None  # where the current call's arguments start
        self._scan: list[Any] = [0, False, False, False]
        self._args_done = False

    def feed(self, text: str) -> list[Event]:
        if self.done:
            self.dropped = self.dropped or bool(text.strip())
            return []
        self._buffer += text
        events: list[Event] = []
        if self._whole:
            head = self._buffer.lstrip()
            if not head or head.startswith(PYTHON_TAG) or head.startswith("{"):
                return events  # hold: this may be a call
            self._whole = False
        while not self.done and self._step(events):
            pass
        return self._filter(events)

    def ends_after(self, text: str) -> bool:
        """Feeds `text`; true once the rest is not wanted (parallel=False, first call complete).
        Non-streamed serving watches a choice with it (server/collect.py)."""
        self.feed(text)
        return self.done

    def finish(self, reason: str | None = None) -> list[Event]:
        """The events left at the end; `reason` is the finish reason (length: cut short)."""
        events: list[Event] = []
        cut = reason == "length"
        if self.done:
            pass
        elif self._whole:
            calls = self._parse_whole(self._buffer)
            if calls is None and (self.forced or cut) and self._buffer.strip():
                self.dropped = True  # an unfinished call object, not text
            elif calls is None:
                events += self._content(self._buffer)
            for call in (calls or [])[: None if self.parallel else 1]:
                events += self._whole_call(call)
        elif self._in_call and self._args_at is None:  # a block that never named a function
            self.dropped = True
        elif not self._in_call and self._buffer and (cut or self.forced):
            self.dropped = True  # a held start of `<tool_call>`
        elif not self._in_call:
            events += self._content(self._buffer)
        self._buffer = ""
        if self._space and not self.calls:
            events.append(("content", self._space))
        self._space = ""
        return self._filter(events)

    def _filter(self, events: list[Event]) -> list[Event]:
        """No content where the output is a call by grammar."""
        if not self.forced:
            return events
        kept = [e for e in events if e[0] != "content"]
        self.dropped = self.dropped or any(e[1].strip() for e in events if e[0] == "content")
        return kept

    # -- hermes, incrementally --------------------------------------------------------------
    def _step(self, events: list[Event]) -> bool:
        if not self._in_call:
            at = self._buffer.find(HERMES_OPEN)
            if at < 0:
                keep = _partial_suffix(self._buffer, HERMES_OPEN)
                events += self._content(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return False
            events += self._content(self._buffer[:at])
            self._buffer = self._buffer[at + len(HERMES_OPEN) :]
            self._in_call, self._args_at, self._args_done = True, None, False
            self._scan = [0, False, False, False]
            return True
        if self._args_at is None:
            head = _CALL_HEAD.match(self._buffer)
            close = self._buffer.find(HERMES_CLOSE)
            if head and _unescape(head.group(1)) in self.names:
                events += self._open(_unescape(head.group(1)))
                self._buffer = self._buffer[head.end() :]
                self._args_at = 0
                return True
            if close >= 0:  # a whole block: a call in another key order, or plain text
                calls = self._parse_whole(self._buffer[:close])
                if calls is not None and len(calls) == 1:
                    events += self._whole_call(calls[0])
                    self.done = not self.parallel
                else:
                    events += self._content(HERMES_OPEN + self._buffer[: close + len(HERMES_CLOSE)])
                self._buffer = self._buffer[close + len(HERMES_CLOSE) :]
                self._in_call = False
                return True
            return False
        if not self._args_done:
            if not self._scan[3]:  # whitespace before the value is not part of it
                rest = self._buffer[self._args_at :]
                self._args_at += len(rest) - len(rest.lstrip())
            end = _json_value_end(self._buffer, self._args_at, self._scan)
            piece = self._buffer[self._args_at : end]
            if piece:
                events.append(("arguments", len(self.calls) - 1, piece))
                self.calls[-1].arguments += piece
            self._args_at = len(self._buffer) if end is None else end
            if end is None:
                return False
            self._args_done = True
        close = self._buffer.find(HERMES_CLOSE, self._args_at)
        if close < 0:
            return False
        self._buffer = self._buffer[close + len(HERMES_CLOSE) :]
        self._in_call = False
        self.done = not self.parallel
        return True

    def _open(self, name: str, call_id: str | None = None) -> list[Event]:
        call = ToolCall(name) if call_id is None else ToolCall(name, id=call_id)
        self.calls.append(call)
        self._space = ""
        return [("call", len(self.calls) - 1, call)]

    def _whole_call(self, call: ToolCall) -> list[Event]:
        events = self._open(call.name, call.id)
        self.calls[-1].arguments = call.arguments
        return [*events, ("arguments", len(self.calls) - 1, call.arguments)]

    def _content(self, text: str) -> list[Event]:
        """Content to send; trailing whitespace waits for more text (none is sent before a call)."""
        body = text.rstrip()
        if not body:
            self._space += text
            return []
        sent, self._space = self._space + body, text[len(body) :]
        return [("content", sent)]

    def _parse_whole(self, text: str) -> list[ToolCall] | None:
        """Llama 3 JSON: one or more call objects (`;`-separated) and nothing else."""
        text = text.strip().removeprefix(PYTHON_TAG).strip()
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                value, end = decoder.raw_decode(text, at)
            except ValueError:
                return None
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                return None
            args = value.get("parameters", value.get("arguments"))
            if value["name"] not in self.names or not isinstance(args, dict):
                return None
            calls.append(ToolCall(value["name"], json.dumps(args)))
            at = end
            while at < len(text) and text[at] in " \n\t;":
                at += 1
        return calls or None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _unescape(name: str) -> str:
    try:
        return json.loads(f'"{name}"')
    except ValueError:
        return name


def parse_output(
    text: str,
    tools: Sequence[Tool],
    parser: str,
    *,
    parallel: bool = True,
    forced: bool = False,
    reason: str | None = None,
) -> tuple[str | None, list[ToolCall]]:
    """The whole output's content and its tool calls (see ToolCallParser for the options).

    Content is None when there is no text beside calls or withheld call markup.
    """
    parsing = ToolCallParser(tools, parser, parallel=parallel, forced=forced)
    events = parsing.feed(text) + parsing.finish(reason)
    content = "".join(e[1] for e in events if e[0] == "content")
    return (content or None) if parsing.calls or parsing.dropped else content, parsing.calls


def answer_watch(
    tools: Sequence[Tool], tool_parser: str, forced: bool, reasoning: str, opened: bool
) -> Callable[[str], bool]:
    """parallel_tool_calls false, not streamed (server/collect.py): fed a choice's
    text, true once the answer's one call is complete (a call written while thinking is not one:
    a reasoning model's thinking is split off first, server/reasoning.py)."""
    calls = ToolCallParser(tools, tool_parser, parallel=False, forced=forced)
    thinking = ReasoningParser(reasoning, opened)
    return lambda text: calls.ends_after(thinking.feed(text).content)
