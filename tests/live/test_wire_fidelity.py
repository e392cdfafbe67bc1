"""Issue 28 live: the default model behind the openai SDK and raw HTTP (httpx), one server."""

from __future__ import annotations

import json

import httpx
import openai
import pydantic
import pytest

from tests.fixtures.server import running_server

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Say hi."}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live():
    with running_server("--autotune", "off", timeout=600) as (base_url, _):
        yield base_url, openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)


def test_a_lone_surrogate_is_a_400_and_the_connection_lives_on(live) -> None:
    base_url, _ = live

    def raw(body: dict, escape: str) -> str:
        """`body` as JSON text with `@` replaced by a surrogate escape (json.dumps would pair)."""
        return json.dumps({"model": MODEL, **body}).replace("@", escape)

    bad = raw(
        {"max_tokens": 2, "messages": [{"role": "user", "content": "emoji @ cut"}]}, "\\ud83d"
    )
    one = httpx.Limits(max_connections=1)
    with httpx.Client(base_url=base_url, limits=one, timeout=300) as client:
        headers = {"content-type": "application/json"}
        refused = client.post("/chat/completions", content=bad, headers=headers)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "messages[0].content"
        assert refused.headers.get("connection") != "close"
        port = refused.extensions["network_stream"].get_extra_info("client_addr")
        for route, body in [
            ("/completions", raw({"prompt": "@"}, "\\udc00")),
            ("/responses", raw({"input": "a @"}, "\\ud800")),
            ("/embeddings", raw({"input": "@"}, "\\ud83d")),
        ]:
            assert client.post(route, content=body, headers=headers).status_code == 400
        good = client.post(
            "/chat/completions",
            json={"model": MODEL, "messages": HI, "max_tokens": 2},
        )
        assert good.status_code == 200, good.text
        assert good.extensions["network_stream"].get_extra_info("client_addr") == port  # reused


class Step(pydantic.BaseModel):
    action: str
    minutes: int


class Recipe(pydantic.BaseModel):
    title: str
    steps: list[Step]


def test_forced_pydantic_tools_with_defs(live) -> None:
    _, client = live
    tool = openai.pydantic_function_tool(Recipe)
    messages = [{"role": "user", "content": "Give me a recipe for tea."}]
    for choice in ("required", {"type": "function", "function": {"name": "Recipe"}}):
        reply = client.chat.completions.create(
            model=MODEL, messages=messages, tools=[tool], tool_choice=choice, max_tokens=120
        )
        call = reply.choices[0].message.tool_calls[0]
        if reply.choices[0].finish_reason != "length":
            Recipe.model_validate_json(call.function.arguments)
    function = tool["function"]
    response = client.responses.create(
        model=MODEL,
        input="Give me a recipe for tea.",
        tools=[{"type": "function", **function}],
        tool_choice="required",
        max_output_tokens=120,
    )
    assert response.output[-1].type == "function_call"


def test_allowed_tools_restrict_the_calls(live) -> None:
    _, client = live
    tools = [
        {"type": "function", "function": {"name": n, "parameters": {"type": "object"}}}
        for n in ("get_weather", "get_time")
    ]
    choice = {
        "type": "allowed_tools",
        "allowed_tools": {
            "mode": "required",
            "tools": [{"type": "function", "function": {"name": "get_time"}}],
        },
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What's the weather in Paris?"}],
        tools=tools,
        tool_choice=choice,
        max_tokens=40,
    )
    assert {c.function.name for c in reply.choices[0].message.tool_calls} == {"get_time"}


def test_responses_logprobs(live) -> None:
    _, client = live
    response = client.responses.create(
        model=MODEL,
        input="Say hi.",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=8,
        temperature=0,
    )
    part = response.output[0].content[0]
    assert part.logprobs and all(len(e.top_logprobs) == 2 for e in part.logprobs)
    assert b"".join(bytes(e.bytes) for e in part.logprobs) == part.text.encode()
    stream = client.responses.create(
        model=MODEL,
        input="Say hi.",
        include=["message.output_text.logprobs"],
        top_logprobs=1,
        max_output_tokens=8,
        temperature=0,
        stream=True,
    )
    deltas = [e for e in stream if e.type == "response.output_text.delta"]
    assert [e.token for d in deltas for e in d.logprobs] == [e.token for e in part.logprobs]


def test_tool_turns_are_checked(live) -> None:
    _, client = live
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    unanswered = [*HI, {"role": "assistant", "tool_calls": [call]}, *HI]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=unanswered, max_tokens=2)
    assert caught.value.body["param"] == "messages[1]"
    nameless = [*HI, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "x"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=nameless, max_tokens=2)
    assert caught.value.body["param"] == "messages[2].tool_call_id"


def test_last_rounds_kinds(live) -> None:
    base_url, client = live
    for key in ("-1", "10000000"):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=2, logit_bias={key: 5}
            )
        assert caught.value.body["param"] == "logit_bias"
    empty = client.completions.create(model=MODEL, prompt="", max_tokens=5, temperature=0)
    assert empty.usage.prompt_tokens == 1 and empty.choices[0].finish_reason
    long = "word " * 9000  # more tokens than the context
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=2
        )
    assert caught.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=long, max_tokens=2)
    assert caught.value.body["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": "msg_nope"}])
    assert caught.value.body["param"] == "input[0].id"
    assert httpx.get(base_url.removesuffix("/v1") + "/health/live").status_code == 200


def test_cached_tokens_are_reported(live) -> None:
    _, client = live
    system = "You are a careful assistant. " * 40  # several KV blocks
    messages = [{"role": "system", "content": system}, *HI]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    response = client.responses.create(
        model=MODEL, instructions=system, input="Say hi.", max_output_tokens=2
    )
    assert response.usage.input_tokens_details.cached_tokens > 0
    json.dumps(response.usage.model_dump())
