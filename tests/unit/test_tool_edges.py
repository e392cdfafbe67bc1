"""Tool calling at its edges (issue 16, items 7-9), with the fake engine: functions without
parameters, parallel_tool_calls false under auto, and call markup cut short by the budget.

Each fault is checked on every route it can occur in: chat streamed and not, and the Responses
API streamed and not. The default model's reproducers are in tests/live/test_wire.py.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.server.tool_parser import ToolCallParser, parse_output
from hearth.server.tools import NO_PARAMETERS, Tool, call_grammar
from tests.unit.test_responses import events_of
from tests.unit.test_tools import CALL, CHAT_TOOLS, SAMPLES, TOOLS, WEATHER, chat, make_client

OTHER = CALL.replace("Paris", "Rome")
TWO_CALLS = f"Checking. {CALL}\n{OTHER} and more text"
CUT = ["<tool_", "Sure <tool_call>", CALL[:30], "text <"]  # markup cut by the budget
FLAT_TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
FORCED = [
    "required",
    {"type": "function", "function": {"name": "get_weather"}},
]


def chunks_of(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line[6:].startswith("{")]


def streamed(client: Any, **body: Any) -> tuple[str | None, list[dict], str]:
    """A streamed chat's content (None when no delta had any), its call deltas, finish."""
    chunks = chunks_of(chat(client, stream=True, **body).text)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    texts = [d["content"] for d in deltas if d.get("content")]
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    return "".join(texts) if texts else None, calls, chunks[-1]["choices"][0]["finish_reason"]


def respond(client: Any, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": "fake-model", **body})


# -- 7: a function without parameters takes none ------------------------------------------------


def test_omitted_parameters_mean_the_empty_object() -> None:
    tool = Tool.checked("get_time", None, None, "tools[0].function.parameters")
    assert tool.parameters == NO_PARAMETERS
    assert NO_PARAMETERS == {"type": "object", "properties": {}, "additionalProperties": False}
    grammar = call_grammar([tool], "hermes", parallel=False)
    assert '"arguments": {"type": "object", "properties": {}, "additionalProperties": false}' in (
        grammar.spec
    )
    client, engine = make_client()
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    named = {"type": "function", "function": {"name": "get_time"}}
    assert chat(client, tools=tools, tool_choice=named).status_code == 200
    assert '"additionalProperties": false' in engine.requests[-1].sampling.grammar.spec
    flat = [{"type": "function", "name": "get_time"}]
    named_flat = {"type": "function", "name": "get_time"}
    assert respond(client, input="hi", tools=flat, tool_choice=named_flat).status_code == 200
    assert '"additionalProperties": false' in engine.requests[-1].sampling.grammar.spec


# -- 8: parallel_tool_calls false keeps one call ------------------------------------------------


def test_parser_keeps_the_first_call_and_drops_the_rest() -> None:
    content, calls = parse_output(TWO_CALLS, TOOLS, "hermes", parallel=False)
    assert content == "Checking." and [json.loads(c.arguments)["city"] for c in calls] == ["Paris"]
    parser = ToolCallParser(TOOLS, "hermes", parallel=False)
    parser.feed(TWO_CALLS[: len("Checking. ") + len(CALL)])
    assert parser.done  # the serving stops generating here
    assert parser.feed(OTHER) == [] and parser.finish() == []
    both = parse_output(TWO_CALLS, TOOLS, "hermes")[1]
    assert len(both) == 2  # parallel by default
    llama = '{"name": "noop", "parameters": {}}; {"name": "noop", "parameters": {"a": 1}}'
    assert len(parse_output(llama, TOOLS, "llama3_json", parallel=False)[1]) == 1


def test_chat_with_parallel_tool_calls_false_returns_one_call_streamed_and_not() -> None:
    client, engine = make_client()
    messages = [{"role": "user", "content": TWO_CALLS.replace("\n", " ")}]
    body = {"tools": CHAT_TOOLS, "messages": messages, "parallel_tool_calls": False}
    data = chat(client, **body).json()
    choice = data["choices"][0]
    assert engine.aborted[-1] == engine.requests[-1].request_id  # it stopped after the call
    assert data["usage"]["completion_tokens"] < len(TWO_CALLS.encode())
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"
    content, calls, finish = streamed(client, **body)
    assert content == "Checking." and finish == "tool_calls"
    assert {c["index"] for c in calls} == {0} and sum("id" in c for c in calls) == 1
    arguments = "".join(c["function"]["arguments"] for c in calls)
    assert json.loads(arguments)["city"] == "Paris"
    assert engine.aborted[-1] == engine.requests[-1].request_id  # it stopped after the call
    both = chat(client, tools=CHAT_TOOLS, messages=messages).json()["choices"][0]["message"]
    assert len(both["tool_calls"]) == 2


def test_responses_with_parallel_tool_calls_false_return_one_call_streamed_and_not() -> None:
    client, engine = make_client()
    body = {"input": TWO_CALLS.replace("\n", " "), "tools": FLAT_TOOLS}
    response = respond(client, parallel_tool_calls=False, **body).json()
    assert engine.aborted[-1] == engine.requests[-1].request_id  # it stopped after the call
    assert response["parallel_tool_calls"] is False and response["status"] == "completed"
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["message", "function_call"]
    assert response["output"][0]["content"][0]["text"] == "Checking."
    assert json.loads(response["output"][1]["arguments"])["city"] == "Paris"
    events = events_of(respond(client, parallel_tool_calls=False, stream=True, **body).text)
    added = [f["item"]["type"] for k, f in events if k == "response.output_item.added"]
    assert added == ["message", "function_call"] and events[-1][0] == "response.completed"
    texts = "".join(f["delta"] for k, f in events if k == "response.output_text.delta")
    assert "tool_call" not in texts
    assert engine.aborted[-1] == engine.requests[-1].request_id
    parallel = respond(client, **body).json()
    assert [i["type"] for i in parallel["output"]].count("function_call") == 2


# -- 9: call markup cut by the budget never reaches content ---------------------------------------


def test_parser_drops_unfinished_call_markup() -> None:
    for text in ["<tool_", "<tool_call>", '<tool_call>\n{"na', "<"]:
        assert parse_output(text, TOOLS, "hermes", reason="length") == (None, [])
        assert parse_output(text, TOOLS, "hermes", forced=True) == (None, [])
    assert parse_output('<tool_call>{"na', TOOLS, "hermes") == (None, [])
    assert parse_output("a < b", TOOLS, "hermes") == ("a < b", [])  # no markup: text
    assert parse_output("Sure <tool_", TOOLS, "hermes", reason="length")[0] == "Sure "
    content, [call] = parse_output(CALL[:-20], TOOLS, "hermes", reason="length")
    assert content is None and call.arguments == '{"city": "Paris", "unit": "ce'  # named: kept
    cut = '{"name": "get_weather", "parameters": {"ci'
    assert parse_output(cut, TOOLS, "llama3_json", reason="length") == (None, [])
    assert parse_output(cut, TOOLS, "llama3_json", forced=True) == (None, [])


def test_a_forced_call_cut_by_the_budget_leaks_no_markup() -> None:
    client, _ = make_client()
    messages = [{"role": "user", "content": CALL}]  # the fake echoes it, cut at 6 tokens
    for choice in [*FORCED, "auto"]:
        body = {"tools": CHAT_TOOLS, "tool_choice": choice, "messages": messages, "max_tokens": 6}
        reply = chat(client, **body).json()["choices"][0]
        assert reply["finish_reason"] == "length"
        assert reply["message"]["content"] is None and "tool_calls" not in reply["message"]
        content, calls, finish = streamed(client, **body)
        assert (content, calls, finish) == (None, [], "length")
    for choice in ["required", {"type": "function", "name": "get_weather"}, "auto"]:
        body = {"input": CALL, "tools": FLAT_TOOLS, "tool_choice": choice}
        response = respond(client, max_output_tokens=6, **body).json()
        assert response["status"] == "incomplete"
        assert all(i["type"] == "message" for i in response["output"])
        assert "tool" not in json.dumps(response["output"])
        events = events_of(respond(client, max_output_tokens=6, stream=True, **body).text)
        texts = "".join(f["delta"] for k, f in events if k == "response.output_text.delta")
        assert texts == "" and events[-1][0] == "response.incomplete"


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([*SAMPLES, TWO_CALLS, *CUT]),
    st.lists(st.integers(0, 200), max_size=10),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, "stop", "length"]),
)
def test_streamed_parse_equals_whole_parse_with_every_option(
    text: str, cuts: list, parallel: bool, forced: bool, reason: str | None
) -> None:
    whole, whole_calls = parse_output(
        text, TOOLS, "hermes", parallel=parallel, forced=forced, reason=reason
    )
    parser = ToolCallParser(TOOLS, "hermes", parallel=parallel, forced=forced)
    events, start = [], 0
    for cut in [*sorted(c % (len(text) + 1) for c in cuts), len(text)]:
        events += parser.feed(text[start:cut])
        start = max(start, cut)
    events += parser.finish(reason)
    content = "".join(e[1] for e in events if e[0] == "content")
    assert content == (whole or "")
    if reason == "length" and text in CUT:  # unfinished markup is never content
        assert "<tool" not in content
    assert [(c.name, c.arguments) for c in parser.calls] == [
        (c.name, c.arguments) for c in whole_calls
    ]
    assert forced is False or content == ""
    assert parallel or len(parser.calls) <= 1
