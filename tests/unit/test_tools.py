"""Tool calling and structured outputs: parser, rendering, validation, the default model live."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.server.tool_parser import ToolCallParser, parse_output
from hearth.server.tools import Tool, call_grammar, prepare_messages
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import assert_envelope, events_of
from tests.unit.test_responses import make_client as make_small_client

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [Tool("get_weather", "Current weather in a city", WEATHER), Tool("noop", None, {})]
CHAT_TOOLS = [{"type": "function", "function": t.to_openai()["function"]} for t in TOOLS[:1]]
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CALL += "</tool_call>"


# -- the parser ------------------------------------------------------------------------------


def feed_in_pieces(text: str, cuts: list[int], parser: str = "hermes") -> tuple[str, list]:
    parsing = ToolCallParser(TOOLS, parser)
    events, start = [], 0
    for cut in [*sorted(cuts), len(text)]:
        events += parsing.feed(text[start:cut])
        start = max(start, cut)
    events += parsing.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    pieces: dict[int, str] = {}
    for event in events:
        if event[0] == "arguments":
            pieces[event[1]] = pieces.get(event[1], "") + event[2]
    calls = [(c.name, c.arguments) for c in parsing.calls]
    assert [pieces.get(i, "") for i in range(len(calls))] == [a for _, a in calls]
    return content, calls


SAMPLES = [
    "Let me check.\n" + CALL.replace("Paris", 'Pa\\"ris {x}') + "\n" + CALL,
    'Here is JSON: {"name": "get_weather", "arguments": {}} and no call.',
    '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call> unknown function',
    '<tool_call>{"arguments": {"city": "Rome", "unit": "celsius"}, "name": "get_weather"}'
    "</tool_call>",
    'cut short <tool_call>{"name": "get_weather", "arguments": {"city": "Os',
    "plain text with a < sign and <tool",
]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SAMPLES), st.lists(st.integers(0, 160), max_size=12))
def test_streamed_parse_equals_whole_parse_whatever_the_chunking(text: str, cuts: list) -> None:
    whole_content, whole_calls = parse_output(text, TOOLS, "hermes")
    content, calls = feed_in_pieces(text, [c % (len(text) + 1) for c in cuts])
    assert calls == [(c.name, c.arguments) for c in whole_calls]
    assert content == (whole_content or "")


def test_parser_finds_real_calls_and_leaves_lookalikes_as_text() -> None:
    content, calls = parse_output(SAMPLES[0], TOOLS, "hermes")
    assert content == "Let me check."
    assert [json.loads(c.arguments)["city"] for c in calls] == ['Pa"ris {x}', "Paris"]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    for text in SAMPLES[1:3] + SAMPLES[5:]:
        assert parse_output(text, TOOLS, "hermes") == (text, [])
    for odd in ["<tool_call>[1]</tool_call>", '<tool_call>{"name": ["x"]}</tool_call>']:
        assert parse_output(odd, TOOLS, "hermes") == (odd, [])  # not calls, and no crash
    bare = '<tool_call>{"name": "noop", "arguments": 42}</tool_call>'
    assert parse_output(bare, TOOLS, "hermes")[1][0].arguments == "42"
    reordered = parse_output(SAMPLES[3], TOOLS, "hermes")[1]
    assert json.loads(reordered[0].arguments) == {"city": "Rome", "unit": "celsius"}
    truncated = parse_output(SAMPLES[4], TOOLS, "hermes")
    assert truncated[0] == "cut short" and truncated[1][0].arguments == '{"city": "Os'


def test_llama3_json_calls_are_whole_outputs_naming_a_tool() -> None:
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}'
    )
    content, calls = parse_output(text, TOOLS, "llama3_json")
    assert content is None and json.loads(calls[0].arguments)["city"] == "Oslo"
    lookalikes = ['{"name": "other", "parameters": {}}', '{"a": 1}', 'Sure: {"name": "noop"}']
    for lookalike in [*lookalikes, "<|python_tag|>[1]", '{"name": ["x"], "parameters": {}}']:
        assert parse_output(lookalike, TOOLS, "llama3_json") == (lookalike, [])


def test_grammar_forces_the_named_format() -> None:
    hermes = call_grammar(TOOLS[:1], "hermes", parallel=True)
    assert hermes.kind == "lark" and '"<tool_call>\\n" %json' in hermes.spec
    assert 'call ("\\n" call)*' in hermes.spec and '"const": "get_weather"' in hermes.spec
    llama = call_grammar(TOOLS, "llama3_json", parallel=True)
    assert "<tool_call>" not in llama.spec and '"parameters"' in llama.spec
    assert "call: call_0 | call_1" in llama.spec


def weather_call_turns(city: str, call_id: str) -> list[dict[str, Any]]:
    """A user question and the assistant's get_weather call, as chat messages."""
    call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
    return [
        {"role": "user", "content": f"Weather in {city}?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": call_id, "type": "function", "function": call}],
        },
    ]


def test_templates_without_tools_get_them_in_the_system_prompt() -> None:
    history = [
        *weather_call_turns("Paris", "call_1"),
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
    ]
    plain, template_tools = prepare_messages(history, TOOLS[:1], template_tools=False)
    assert template_tools is None and plain[0]["role"] == "system"
    assert '"name": "get_weather"' in plain[0]["content"] and "<tools>" in plain[0]["content"]
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert plain[2]["content"] == f"<tool_call>\n{call}\n</tool_call>"
    assert plain[3] == {"role": "tool", "content": '{"temp": 18}'}
    aware, tools = prepare_messages(history, TOOLS[:1], template_tools=True)
    assert tools == [TOOLS[0].to_openai()]
    assert aware[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert history[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'


# -- the API with a fake engine ---------------------------------------------------------------


def make_client() -> tuple[Any, FakeEngine]:
    """The fake engine with room for the tool prompt (its tokens are bytes)."""
    return make_small_client(FakeEngine(max_model_len=4096))


def chat(client: Any, **body: Any) -> Any:
    messages = body.pop("messages", [{"role": "user", "content": "hi"}])
    return client.post(
        "/v1/chat/completions", json={"model": "fake-model", "messages": messages, **body}
    )


def test_invalid_tools_and_schemas_are_400_naming_the_field() -> None:
    client, _ = make_client()
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]
    assert_envelope(chat(client, tools=bad_schema), 400, "tools[0].function.parameters")
    bad_name = [{"type": "function", "function": {"name": "no spaces"}}]
    assert_envelope(chat(client, tools=bad_name), 400, "tools[0].function.name")
    assert_envelope(chat(client, tool_choice="required"), 400, "tool_choice")
    assert_envelope(chat(client, tools=CHAT_TOOLS, tool_choice="sometimes"), 400, "tool_choice")
    other = {"type": "function", "function": {"name": "other"}}
    assert_envelope(chat(client, tools=CHAT_TOOLS, tool_choice=other), 400, "tool_choice")
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    assert_envelope(chat(client, response_format=fmt), 400, "response_format.json_schema.schema")
    assert_envelope(chat(client, response_format={"type": "xml"}), 400, "response_format.type")
    flat = [{"type": "function", "name": "f", "parameters": {"required": "city"}}]
    response = client.post(
        "/v1/responses", json={"model": "fake-model", "input": "hi", "tools": flat}
    )
    assert_envelope(response, 400, "tools[0].parameters")


def test_forced_calls_and_formats_reach_the_engine_as_grammars() -> None:
    client, engine = make_client()
    assert chat(client, tools=CHAT_TOOLS, tool_choice="required").status_code == 200
    assert engine.requests[-1].sampling.grammar.kind == "lark"
    assert chat(client, tools=CHAT_TOOLS).status_code == 200
    assert engine.requests[-1].sampling.grammar is None  # auto: free text, parsed afterwards
    chat(client, response_format={"type": "json_object"})
    assert json.loads(engine.requests[-1].sampling.grammar.spec) == {"type": "object"}
    prompt = engine.decode(engine.requests[-2].prompt_token_ids)
    assert "get_weather" in prompt  # the fake's template has no tools: the system prompt does


def test_calls_in_output_become_tool_calls_streamed_and_not() -> None:
    client, _ = make_client()
    messages = [{"role": "user", "content": "Checking. " + CALL}]  # the fake echoes it
    body = chat(client, tools=CHAT_TOOLS, messages=messages).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Paris", "unit": "celsius"}',
    }
    stream = chat(client, tools=CHAT_TOOLS, messages=messages, stream=True).text
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line[6:].startswith("{")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and c["index"] == 0 for c in calls[1:]) and len(calls) > 3
    assert "".join(c["function"]["arguments"] for c in calls) == call["function"]["arguments"]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    none = chat(client, tools=CHAT_TOOLS, messages=messages, tool_choice="none").json()
    assert none["choices"][0]["message"]["content"] == "Checking. " + CALL


def test_responses_function_call_items_and_events() -> None:
    client, _ = make_client()
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    body = {"model": "fake-model", "input": CALL, "tools": tools}
    response = client.post("/v1/responses", json=body).json()
    [item] = response["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather"
    assert item["call_id"].startswith("call_") and item["id"].startswith("fc_")
    assert response["tools"][0]["name"] == "get_weather"
    events = events_of(client.post("/v1/responses", json={**body, "stream": True}).text)
    kinds = [kind for kind, _ in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [d["delta"] for k, d in events if k == "response.function_call_arguments.delta"]
    done = events[-3][1]
    assert "".join(deltas) == done["arguments"] == item["arguments"]
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))


# -- the default model, through the official SDK ------------------------------------------------

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0, "maximum": 130},
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "age", "address"],
        "additionalProperties": False,
    },
    "order": {
        "type": "object",
        "properties": {
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
                "minItems": 1,
            },
            "priority": {"enum": ["low", "normal", "high"]},
            "gift": {"type": "boolean"},
        },
        "required": ["items", "priority", "gift"],
        "additionalProperties": False,
    },
    "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}},
}
