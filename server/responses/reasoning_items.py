"""Reasoning in the Responses API: the `reasoning` output item, its stream events, and reasoning
sent back as input.

The item is OpenAI's ResponseReasoningItem:
`{"type": "reasoning", "id": "rs_…", "summary": [{"type": "summary_text", "text"}],
"content": [{"type": "reasoning_text", "text"}], "encrypted_content": null, "status"}`.
It comes before the message and function_call items of the same response.

Summaries: hearth does not summarise. When the request asks for one (`reasoning.summary` auto,
concise or detailed), the summary is the full reasoning text as one `summary_text` part; else
it is `[]`. `encrypted_content` is always null (hearth keeps no secret state).

Streamed, the item's events come in OpenAI's order: `response.output_item.added` (in
progress), `response.reasoning_text.delta` per piece, `response.reasoning_text.done`, then with
a summary `response.reasoning_summary_part.added`, `response.reasoning_summary_text.delta`,
`response.reasoning_summary_text.done`, `response.reasoning_summary_part.done`, and last
`response.output_item.done`.
"""

from __future__ import annotations

import uuid
from typing import Any

from hearth.server.reasoning import ReasoningParser, Split

StreamEvent = tuple[str, dict[str, Any]]  # (event type, its fields)


class Reasoning:
    """One sample's reasoning split off its output as it streams (`ReasoningParser`), and
    whether the request asked for a summary of it."""

    def __init__(self, parser: str, opened: bool, summary: bool = False) -> None:
        self.parser = ReasoningParser(parser, opened)
        self.summary = summary

    @property
    def tokens(self) -> int:
        """Reasoning tokens counted so far (`split` with a token count)."""
        return self.parser.reasoning_tokens

    def split(self, text: str, num_tokens: int = 0) -> Split:
        return self.parser.count(text, num_tokens)

    def finish(self) -> Split:
        return self.parser.finish()


def reasoning_item(text: str = "", status: str = "in_progress") -> dict[str, Any]:
    """A new ResponseReasoningItem (its summary is filled in when it closes)."""
    return {
        "type": "reasoning",
        "id": f"rs_{uuid.uuid4().hex}",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "encrypted_content": None,
        "status": status,
    }


def item_text(item: dict[str, Any]) -> str:
    return "".join(part["text"] for part in item["content"])


def delta_event(item: dict[str, Any], output_index: int, delta: str) -> StreamEvent:
    where = {"item_id": item["id"], "output_index": output_index, "content_index": 0}
    return "response.reasoning_text.delta", {**where, "delta": delta}


def close_events(item: dict[str, Any], output_index: int, summary: bool) -> list[StreamEvent]:
    """The events that finish the item's text (and its summary, when asked for); the caller
    adds `response.output_item.done`. Sets the item's summary."""
    text = item_text(item)
    where = {"item_id": item["id"], "output_index": output_index}
    events: list[StreamEvent] = [
        ("response.reasoning_text.done", {**where, "content_index": 0, "text": text})
    ]
    if not summary:
        return events
    part = {"type": "summary_text", "text": text}
    item["summary"] = [part]
    at = {**where, "summary_index": 0}
    events += [
        ("response.reasoning_summary_part.added", {**at, "part": {**part, "text": ""}}),
        ("response.reasoning_summary_text.delta", {**at, "delta": text}),
        ("response.reasoning_summary_text.done", {**at, "text": text}),
        ("response.reasoning_summary_part.done", {**at, "part": dict(part)}),
    ]
    return events


# -- conversation state ---------------------------------------------------------------------------


def with_reasoning(turn: dict[str, Any], text: str) -> None:
    """Put reasoning on an assistant template message: `reasoning_content` (Qwen3's and
    DeepSeek's templates read it) and `reasoning` (vLLM's newer name). Templates that render
    neither ignore it."""
    if not text:
        return
    earlier = turn.get("reasoning_content")
    text = f"{earlier}\n\n{text}" if earlier else text
    turn["reasoning_content"] = turn["reasoning"] = text


def output_reasoning(output: list[dict[str, Any]]) -> str:
    """The reasoning text of a response's output items."""
    return "\n\n".join(
        text for item in output if item["type"] == "reasoning" for text in [item_text(item)] if text
    )
