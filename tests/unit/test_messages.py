"""Anthropic's Messages API (issue 31) over the fake engine: the message and its events (checked
against the anthropic SDK's own types and stream accumulator), content blocks to the chat
template, tools and tool_choice, thinking, stop sequences, count_tokens, pings, errors in
Anthropic's envelope (and the OpenAI routes keeping theirs), x-api-key."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.lib.streaming._messages import accumulate_event

from hearth.engine.types import GenerationOutput, ThinkBlock
from hearth.server.messages import convert, serving
from hearth.server.messages.blocks import matched_stop, stop_reason
from hearth.server.messages.protocol import MessagesRequest
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_chat_reasoning import THOUGHT, thinking_client
from tests.unit.test_responses import events_of, make_client
from tests.unit.test_tools import CALL, WEATHER

TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER}]


def post(client: Any, content: Any = "Hello there", **body: Any) -> Any:
    messages = body.pop("messages", [{"role": "user", "content": content}])
    payload = {"model": "fake-model", "max_tokens": 200, "messages": messages, **body}
    return client.post("/v1/messages", json=payload)


def accumulated(text: str) -> dict[str, Any]:
    """The stream's events through the SDK's own accumulator: the message a client ends with."""
    snapshot = None
    bufs: dict[int, bytes] = {}
    for name, data in events_of(text):
        assert name == data["type"]
        if name in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None
    return snapshot.to_dict()


def test_a_message_in_anthropic_shape() -> None:
    client, engine = make_client()
    data = post(client, system="Be brief.").json()
    anthropic.types.Message.model_validate(data)
    assert data["id"].startswith("msg_") and data["type"] == "message"
    assert data["role"] == "assistant" and data["model"] == "fake-model"
    assert data["content"] == [{"type": "text", "text": "Hello there"}]
    assert data["stop_reason"] == "end_turn" and data["stop_sequence"] is None
    prompt = engine.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.startswith("system: Be brief.\nuser: Hello there")
    usage = data["usage"]
    assert usage["output_tokens"] == len("Hello there") and usage["cache_read_input_tokens"] == 0
    counted = client.post(
        "/v1/messages/count_tokens",
        json={
            "model": "fake-model",
            "system": "Be brief.",
            "messages": [{"role": "user", "content": "Hello there"}],
        },
    ).json()
    assert counted == {"input_tokens": usage["input_tokens"] + usage["cache_read_input_tokens"]}
    cut = post(client, max_tokens=3).json()
    assert cut["stop_reason"] == "max_tokens" and cut["content"][0]["text"] == "Hel"


def test_system_blocks_sampling_and_metadata_reach_the_engine() -> None:
    client, engine = make_client()
    system = [
        {"type": "text", "text": "One."},
        {"type": "text", "text": "Two.", "cache_control": {"type": "ephemeral"}},
    ]
    body = {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 7,
        "stop_sequences": ["zz"],
        "metadata": {"user_id": "u1"},
    }
    assert post(client, system=system, **body).status_code == 200
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.5, 0.9, 7)
    assert sampling.stop == ["zz"] and sampling.n == 1
    assert engine.decode(engine.requests[-1].prompt_token_ids).startswith("system: One.\n\nTwo.")


def test_stop_sequence_is_told_from_the_end_of_turn() -> None:
    engine = FakeEngine()
    ids = list(b"Hello END more")
    assert matched_stop(engine, "Hello ", ids, ["zz", "END", "more"]) == "END"
    assert matched_stop(engine, "Hello", list(b"Hello"), ["END"]) is None  # ended on its own
    assert matched_stop(engine, "Hello", ids, []) is None
    assert stop_reason("stop", 0, "END") == "stop_sequence"
    assert stop_reason("stop", 1, None) == "tool_use"
    assert stop_reason("length", 1, None) == "max_tokens"
    assert stop_reason("stop", 0, None) == "end_turn"


def test_streamed_events_in_order_and_equal_to_the_message() -> None:
    client, _ = make_client()
    whole = post(client).json()
    response = post(client, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    names = [name for name, _ in events_of(response.text)]
    assert names == [
        "message_start",
        "ping",
        "content_block_start",
        *["content_block_delta"] * len("Hello there"),
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert "[DONE]" not in response.text
    final = accumulated(response.text)
    assert {**final, "id": None} == {**whole, "id": None}


def test_tool_use_streamed_and_not() -> None:
    client, _ = make_client(FakeEngine(max_model_len=4096))
    content = f"Let me check. {CALL}"
    data = post(client, content, tools=TOOLS).json()
    anthropic.types.Message.model_validate(data)
    text, call = data["content"]
    assert text == {"type": "text", "text": "Let me check."}
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_")
    assert call["name"] == "get_weather" and call["input"] == {"city": "Paris", "unit": "celsius"}
    assert data["stop_reason"] == "tool_use"
    stream = post(client, content, tools=TOOLS, stream=True).text
    deltas = [d["delta"]["type"] for n, d in events_of(stream) if n == "content_block_delta"]
    assert "input_json_delta" in deltas and "text_delta" in deltas
    final = accumulated(stream)
    final["content"][1]["id"] = call["id"]
    assert {**final, "id": None} == {**data, "id": None}


def test_tool_choice_and_parallel_calls() -> None:
    client, engine = make_client(FakeEngine(max_model_len=4096))
    post(client, CALL, tools=TOOLS, tool_choice={"type": "any"})
    assert engine.requests[-1].sampling.grammar.kind == "lark"
    post(client, CALL, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"})
    assert engine.requests[-1].sampling.grammar.kind == "lark"
    data = post(client, CALL, tools=TOOLS, tool_choice={"type": "none"}).json()
    assert data["content"][0]["type"] == "text" and data["stop_reason"] == "end_turn"
    body = {"tools": TOOLS, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    one = post(client, CALL + CALL, **body).json()
    assert [b["type"] for b in one["content"]] == ["tool_use"]
    streamed = accumulated(post(client, CALL + CALL, stream=True, **body).text)
    assert [b["type"] for b in streamed["content"]] == ["tool_use"]
    assert streamed["stop_reason"] == "tool_use"
    missing = post(client, CALL, tools=TOOLS, tool_choice={"type": "tool", "name": "nope"})
    assert_anthropic(missing, 400, "invalid_request_error", "tool_choice")


def test_history_blocks_map_to_template_messages() -> None:
    body = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 5,
            "system": "S",
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "look it up", "signature": "sig"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "is_error": True,
                            "content": [{"type": "text", "text": "no such city"}],
                        },
                        {"type": "text", "text": "and then?"},
                    ],
                },
            ],
        }
    )
    rendered = convert.template_messages(body)
    assert rendered[0] == {"role": "system", "content": "S"}
    assert rendered[1] == {"role": "user", "content": "weather?"}
    assistant = rendered[2]
    assert assistant["content"] == "Checking." and assistant["reasoning_content"] == "look it up"
    [call] = assistant["tool_calls"]
    assert call["id"] == "toolu_1" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }
    assert rendered[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert rendered[4]["content"] == "Error: no such city"
    assert rendered[5] == {"role": "user", "content": "and then?"}


def test_thinking_blocks_and_controls() -> None:
    client, engine = thinking_client()
    data = post(client, THOUGHT).json()
    anthropic.types.Message.model_validate(data)
    assert data["content"] == [
        {"type": "thinking", "thinking": " The user wants a city. ", "signature": ""},
        {"type": "text", "text": "Paris."},
    ]
    final = accumulated(post(client, THOUGHT, stream=True).text)
    assert {**final, "id": None} == {**data, "id": None}
    post(client, thinking={"type": "enabled", "budget_tokens": 9})
    assert engine.seen_kwargs[-1] == {"enable_thinking": True}
    assert engine.requests[-1].sampling.grammar.think == ThinkBlock(opened=False, max_tokens=9)
    post(client, thinking={"type": "adaptive"})
    assert engine.seen_kwargs[-1] == {"enable_thinking": True}
    assert engine.requests[-1].sampling.grammar is None  # no budget: nothing constrained
    post(client, thinking={"type": "disabled"})
    assert engine.seen_kwargs[-1]["enable_thinking"] is False
    missing = post(client, thinking={"type": "enabled"})
    assert_anthropic(missing, 400, "invalid_request_error", "thinking.budget_tokens")


def assert_anthropic(response: Any, status: int, kind: str, names: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}
    if names:
        assert names in body["error"]["message"], body
    return body["error"]["message"]


def test_errors_in_anthropic_envelope_only_on_its_routes() -> None:
    client, _ = make_client(max_body_bytes=2000)
    missing = client.post("/v1/messages", json={"model": "fake-model", "messages": []})
    assert_anthropic(missing, 400, "invalid_request_error", "messages")
    no_max = client.post(
        "/v1/messages", json={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
    )
    assert_anthropic(no_max, 400, "invalid_request_error", "max_tokens")
    bad_block = post(client, [{"type": "document", "source": {}}])
    assert_anthropic(bad_block, 400, "invalid_request_error", "messages[0].content[0]")
    image = [
        {"type": "text", "text": "see"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
    ]
    text_only = assert_anthropic(post(client, image), 400, "invalid_request_error", "content[1]")
    assert "'image'" in text_only and "messages[0].content[1]:" in text_only
    seeing, _ = make_client(FakeEngine())
    seeing.app.state.registry.get("fake-model").info.vision = True
    image[1]["source"]["data"] = "not base64!"
    unreadable = post(seeing, image)
    assert_anthropic(unreadable, 400, "invalid_request_error", "messages[0].content[1].source")
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    refused = post(seeing, [url])  # image URLs are off unless --allow-image-urls
    assert_anthropic(refused, 400, "invalid_request_error", "messages[0].content[0].source")
    bad_schema = post(client, tools=[{"name": "f", "input_schema": {"type": "nonsense"}}])
    assert_anthropic(bad_schema, 400, "invalid_request_error", "tools[0].input_schema")
    server_tool = post(client, tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert_anthropic(server_tool, 400, "invalid_request_error", "tools[0].type")
    unknown = post(client, model="nope")
    assert_anthropic(unknown, 404, "not_found_error", "model")
    assert_anthropic(client.post("/v1/messages/nope", json={}), 404, "not_found_error")
    too_long = post(client, max_tokens=100_000)
    assert_anthropic(too_long, 400, "invalid_request_error", "max_tokens")
    huge = post(client, "x" * 5000)
    assert_anthropic(huge, 413, "request_too_large")
    client.app.state.registry.get("fake-model").alive = False  # the engine has stopped
    assert_anthropic(post(client), 529, "overloaded_error", "fake-model")
    openai_route = client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    assert openai_route.status_code == 400 and openai_route.json()["error"]["param"] == "messages"


def test_x_api_key_beside_bearer() -> None:
    client, _ = make_client(api_keys=("secret",))
    assert_anthropic(post(client), 401, "authentication_error")
    headers = {"x-api-key": "secret", "anthropic-version": "2023-06-01"}
    assert (
        client.post(
            "/v1/messages",
            headers=headers,
            json={
                "model": "fake-model",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ).status_code
        == 200
    )
    wrong = client.post("/v1/messages", headers={"x-api-key": "nope"}, json={})
    assert_anthropic(wrong, 401, "authentication_error")
    bearer = client.get("/v1/models", headers={"Authorization": "Bearer secret"})
    assert bearer.status_code == 200
    assert client.get("/v1/models", headers={"x-api-key": "secret"}).status_code == 200


def test_pings_while_waiting_and_an_error_mid_stream(monkeypatch) -> None:
    engine = FakeEngine()
    engine.delay = 0.05
    client, _ = make_client(engine)
    monkeypatch.setattr(serving, "PING_EVERY_S", 0.02)
    names = [n for n, _ in events_of(post(client, "abc", stream=True).text)]
    assert names.count("ping") > 1 and names[-1] == "message_stop"
    engine.delay = 0.0
    generate = engine.generate

    async def failing(request: Any) -> Any:
        async for output in generate(request):
            yield output
            yield GenerationOutput(request.request_id, 0, [], "", 3, 1, "error", error="boom")
            return

    engine.generate = failing
    name, data = events_of(post(client, "abc", stream=True).text)[-1]
    assert name == "error" and data == {
        "type": "error",
        "error": {"type": "api_error", "message": "boom"},
    }


def test_the_anthropic_sdk_in_process() -> None:
    """The official client (over httpx2's ASGI transport): create, stream, count, errors."""
    app = make_client(api_keys=("k",))[0].app

    async def run() -> None:
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
        sdk = anthropic.AsyncAnthropic(
            base_url="http://testserver", api_key="k", http_client=http, max_retries=0
        )
        messages = [{"role": "user", "content": "Hi SDK"}]
        message = await sdk.messages.create(model="fake-model", max_tokens=20, messages=messages)
        assert message.content[0].text == "Hi SDK"
        async with sdk.messages.stream(
            model="fake-model", max_tokens=20, messages=messages
        ) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "Hi SDK"
        assert {**final.to_dict(), "id": None} == {**message.to_dict(), "id": None}
        count = await sdk.messages.count_tokens(model="fake-model", messages=messages)
        assert count.input_tokens == message.usage.input_tokens
        with pytest.raises(anthropic.NotFoundError):
            await sdk.messages.create(model="nope", max_tokens=5, messages=messages)
        with pytest.raises(anthropic.BadRequestError):
            await sdk.messages.create(model="fake-model", max_tokens=5, messages=[])
        bad_key = sdk.with_options(api_key="wrong")
        with pytest.raises(anthropic.AuthenticationError):
            await bad_key.messages.create(model="fake-model", max_tokens=5, messages=messages)
        await http.aclose()

    asyncio.run(run())


def test_disconnects_abort_and_metrics_count_the_route(caplog) -> None:
    """As on the OpenAI routes (tests/unit/test_wire.py): a client that leaves is a quiet 499
    that aborts its request, streamed or not; /metrics counts the route."""
    from tests.unit.test_wire import _leave_early

    client, engine = make_client()
    engine.delay = 0.02
    long = "a long answer that takes a while to generate, one token at a time"
    for stream in (False, True):
        body = {
            "model": "fake-model",
            "max_tokens": 100,
            "stream": stream,
            "messages": [{"role": "user", "content": long}],
        }
        sent = asyncio.run(_leave_early(client.app, "/v1/messages", body))
        statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
        assert statuses in ([], [499], [200]), (stream, statuses)
    assert len(set(engine.aborted)) == 2
    engine.delay = 0.0
    assert post(client).status_code == 200
    page = client.get("/metrics").text
    assert 'hearth_http_requests_total{route="/v1/messages",status="499"} 2.0' in page
    assert 'hearth_http_requests_total{route="/v1/messages",status="200"} 1.0' in page
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
