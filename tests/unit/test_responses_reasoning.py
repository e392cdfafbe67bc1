"""Reasoning models on the Responses API (issue 17): the `reasoning` output item before the
answer, its stream events, reasoning_tokens, reasoning sent back as input and carried by
previous_response_id, and the request's reasoning controls (fake engine; one live test)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import assert_envelope, events_of, make_client, sdk
from tests.unit.test_tool_edges import FLAT_TOOLS
from tests.unit.test_tools import CALL

THOUGHT = "<think>plan</think>answer"
EVENTS = TypeAdapter(ResponseStreamEvent)


class ThinkingEngine(FakeEngine):
    """A fake thinking model (think_tags) that records what each chat was rendered from."""

    def __init__(self) -> None:
        super().__init__(max_model_len=4096)
        self.info.reasoning_parser = "think_tags"
        self.chats: list[tuple[list[dict[str, Any]], dict[str, Any] | None]] = []

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Any = None, template_kwargs: Any = None
    ) -> list[int]:
        self.chats.append((list(messages), template_kwargs))
        return super().encode_chat(messages, tools, template_kwargs)


def thinking_client() -> tuple[Any, ThinkingEngine]:
    client, engine = make_client(ThinkingEngine())
    return client, engine


def create(client: Any, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": "fake-model", "input": THOUGHT, **body})


def typed(events: list[tuple[str, dict]]) -> list[Any]:
    """Every event parsed by the SDK's own event types (and of the type its line names)."""
    parsed = [EVENTS.validate_python(data) for _, data in events]
    assert [e.type for e in parsed] == [kind for kind, _ in events]
    return parsed


def test_reasoning_item_comes_before_the_message() -> None:
    client, _ = thinking_client()
    data = create(client, temperature=0).json()
    parsed = Response.model_validate(data)
    assert parsed.output_text == "answer"
    reasoning, message = data["output"]
    assert reasoning["id"].startswith("rs_") and reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "plan"}]
    assert reasoning["summary"] == [] and reasoning["encrypted_content"] is None
    assert reasoning["status"] == "completed" and message["status"] == "completed"
    assert message["content"][0]["text"] == "answer"
    tokens = data["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert 0 < tokens <= len("<think>plan</think>") and data["usage"]["output_tokens"] == 25
    assert data["reasoning"] == {"effort": None, "summary": None}
    summarised = create(client, reasoning={"summary": "auto", "effort": "high"}).json()
    assert summarised["output"][0]["summary"] == [{"type": "summary_text", "text": "plan"}]
    assert summarised["reasoning"] == {"effort": "high", "summary": "auto"}
    assert Response.model_validate(summarised).output[0].summary[0].text == "plan"


def test_without_a_reasoning_parser_the_tags_are_content() -> None:
    client, engine = make_client(FakeEngine())
    data = create(client).json()
    assert [item["type"] for item in data["output"]] == ["message"]
    assert data["output"][0]["content"][0]["text"] == THOUGHT
    assert data["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    engine.info.reasoning_parser = "think_tags"  # no block at the start: all content
    data = create(client, input="answer <think>x</think>").json()
    assert [item["type"] for item in data["output"]] == ["message"]
    assert data["usage"]["output_tokens_details"]["reasoning_tokens"] == 0


def test_stream_sends_the_reasoning_item_first_in_openai_order() -> None:
    client, _ = thinking_client()
    whole = create(client).json()
    events = events_of(create(client, stream=True).text)
    parsed = typed(events)
    kinds = [kind for kind, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.reasoning_text.delta"] * 4,
        "response.reasoning_text.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 6,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in parsed] == list(range(len(parsed)))
    final = events[-1][1]["response"]
    reasoning_id, message_id = (item["id"] for item in final["output"])
    assert events[2][1]["item"]["type"] == "reasoning"
    assert events[2][1]["item"]["status"] == "in_progress" and events[2][1]["output_index"] == 0
    deltas = [d for k, d in events if k == "response.reasoning_text.delta"]
    assert "".join(d["delta"] for d in deltas) == "plan"
    assert {(d["item_id"], d["output_index"], d["content_index"]) for d in deltas} == {
        (reasoning_id, 0, 0)
    }
    assert events[7][1]["text"] == "plan" and events[8][1]["item"]["status"] == "completed"
    assert events[9][1]["item"]["type"] == "message" and events[9][1]["output_index"] == 1
    texts = [d for k, d in events if k == "response.output_text.delta"]
    assert {(d["item_id"], d["output_index"]) for d in texts} == {(message_id, 1)}
    assert final["output"][0]["content"][0]["text"] == "plan"
    usage = final["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert usage == whole["usage"]["output_tokens_details"]["reasoning_tokens"]


def test_stream_with_a_summary_adds_its_part_events() -> None:
    client, _ = thinking_client()
    events = events_of(create(client, stream=True, reasoning={"summary": "detailed"}).text)
    typed(events)
    kinds = [kind for kind, _ in events]
    at = kinds.index("response.reasoning_text.done")
    assert kinds[at : at + 6] == [
        "response.reasoning_text.done",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    assert events[at + 2][1]["delta"] == "plan" and events[at + 3][1]["text"] == "plan"
    assert events[at + 1][1]["summary_index"] == 0
    assert events[at + 4][1]["part"] == {"type": "summary_text", "text": "plan"}
    assert events[at + 5][1]["item"]["summary"] == [{"type": "summary_text", "text": "plan"}]


def test_sdk_streams_and_parses_reasoning() -> None:
    client, _ = thinking_client()
    api = sdk(client)
    with api.responses.stream(model="fake-model", input=THOUGHT) as stream:
        reasoning = "".join(e.delta for e in stream if e.type == "response.reasoning_text.delta")
        final = stream.get_final_response()
    assert reasoning == "plan" and final.output_text == "answer"
    assert final.output[0].type == "reasoning" and final.output[0].content[0].text == "plan"
    assert final.usage.output_tokens_details.reasoning_tokens > 0


def test_tool_calls_are_parsed_in_the_answer_only() -> None:
    client, _ = thinking_client()
    text = f"<think>maybe {CALL}</think>Checking. {CALL}"
    body = {"input": text, "tools": FLAT_TOOLS}
    data = create(client, **body).json()
    Response.model_validate(data)
    assert [item["type"] for item in data["output"]] == ["reasoning", "message", "function_call"]
    assert data["output"][0]["content"][0]["text"] == f"maybe {CALL}"
    assert data["output"][1]["content"][0]["text"] == "Checking."
    assert json.loads(data["output"][2]["arguments"])["city"] == "Paris"
    events = events_of(create(client, stream=True, **body).text)
    typed(events)
    added = [
        (f["output_index"], f["item"]["type"])
        for k, f in events
        if k == "response.output_item.added"
    ]
    assert added == [
        (0, "reasoning"),
        (1, "message"),
        (2, "function_call"),
    ]
    final = events[-1][1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message", "function_call"]
    one = create(client, parallel_tool_calls=False, **body).json()  # the call in the answer
    assert [item["type"] for item in one["output"]] == ["reasoning", "message", "function_call"]
    only_thought = create(client, input=f"<think>{CALL}</think>no call", tools=FLAT_TOOLS).json()
    assert [item["type"] for item in only_thought["output"]] == ["reasoning", "message"]


def test_reasoning_items_sent_back_reach_the_template() -> None:
    client, engine = thinking_client()
    api = sdk(client)
    first = api.responses.create(model="fake-model", input=[{"role": "user", "content": THOUGHT}])
    assert [item.type for item in first.output] == ["reasoning", "message"]
    history = [
        {"role": "user", "content": THOUGHT},
        *(item.model_dump(exclude_none=True) for item in first.output),
        {"role": "user", "content": "next"},
    ]
    second = api.responses.create(model="fake-model", input=history)
    assert second.output_text == "next"
    messages, _ = engine.chats[-1]
    assert messages[1]["role"] == "assistant" and messages[1]["content"] == "answer"
    assert messages[1]["reasoning_content"] == messages[1]["reasoning"] == "plan"
    assert "reasoning_content" not in messages[0] and "reasoning_content" not in messages[2]
    # summary-only items give their summary; a call after the reasoning carries it
    items = [
        {"role": "user", "content": "q"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": "opaque"},
        {"role": "user", "content": "ok"},
    ]
    assert create(client, input=items).status_code == 200
    messages, _ = engine.chats[-1]
    assert messages[1]["reasoning_content"] == "s" and "get_weather" in messages[1]["content"]
    assert all("reasoning" not in m for m in messages[2:])


def test_previous_response_id_carries_the_reasoning() -> None:
    client, engine = thinking_client()
    first = create(client).json()
    create(client, input="more", previous_response_id=first["id"])
    messages, _ = engine.chats[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == "answer" and messages[1]["reasoning_content"] == "plan"
    streamed = events_of(create(client, stream=True).text)[-1][1]["response"]
    create(client, input="more", previous_response_id=streamed["id"])
    assert engine.chats[-1][0][1]["reasoning"] == "plan"


def test_effort_and_template_kwargs_reach_the_template_and_the_grammar() -> None:
    client, engine = thinking_client()
    data = create(client, reasoning={"effort": "none"}).json()
    assert engine.chats[-1][1] == {"reasoning_effort": "none", "enable_thinking": False}
    grammar = engine.requests[-1].sampling.grammar
    assert grammar.think is not None and grammar.think.max_tokens == 0
    assert grammar.think.opened is False
    assert data["reasoning"] == {"effort": "none", "summary": None}
    create(client, reasoning={"effort": "low"}, chat_template_kwargs={"enable_thinking": True})
    assert engine.chats[-1][1] == {"reasoning_effort": "low", "enable_thinking": True}
    assert engine.requests[-1].sampling.grammar.think.max_tokens == 1024
    create(client, max_reasoning_tokens=5, reasoning={"effort": None, "summary": None})
    assert engine.chats[-1][1] == {}
    assert engine.requests[-1].sampling.grammar.think.max_tokens == 5
    create(client)
    assert engine.requests[-1].sampling.grammar is None  # no budget, no format: unchanged
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"format": {"type": "json_schema", "name": "a", "schema": schema}}
    create(client, text=fmt)
    grammar = engine.requests[-1].sampling.grammar
    assert grammar.kind == "json_schema" and grammar.think.max_tokens is None


def test_a_prompt_that_opens_the_block_makes_the_output_reasoning() -> None:
    client, engine = thinking_client()
    data = create(client, input="still thinking <think>", max_output_tokens=5).json()
    assert engine.requests[-1].sampling.grammar is None
    reasoning, message = data["output"]  # the block never closed: reasoning, an empty answer
    assert reasoning["content"][0]["text"] == "still" and message["content"][0]["text"] == ""
    assert data["status"] == "incomplete" and reasoning["status"] == "incomplete"
    assert data["usage"]["output_tokens_details"]["reasoning_tokens"] == 5


def test_bad_reasoning_fields_are_400_naming_them() -> None:
    client, _ = thinking_client()
    assert_envelope(create(client, reasoning={"effort": "extreme"}), 400, "reasoning.effort")
    assert_envelope(create(client, reasoning={"summary": "long"}), 400, "reasoning.summary")
    assert_envelope(create(client, reasoning="high"), 400, "reasoning")
    assert_envelope(create(client, max_reasoning_tokens=-1), 400, "max_reasoning_tokens")
    assert_envelope(create(client, chat_template_kwargs=[1]), 400, "chat_template_kwargs")
    bad = [{"type": "reasoning", "content": [{"type": "reasoning_text"}]}]
    assert_envelope(create(client, input=bad), 400, "input[0].content[0].text")


def test_a_block_the_prompt_closed_means_no_reasoning_item(monkeypatch) -> None:
    from hearth.server import turn

    monkeypatch.setattr(turn, "prompt_block", lambda engine, ids: "closed")
    client, engine = thinking_client()
    data = create(client, max_reasoning_tokens=4).json()
    assert [item["type"] for item in data["output"]] == ["message"]
    assert data["output"][0]["content"][0]["text"] == THOUGHT
    assert data["usage"]["output_tokens_details"]["reasoning_tokens"] == 0
    assert engine.requests[-1].sampling.grammar is None  # no think block: nothing to force
