"""Exact-to-the-byte wire details over a fake engine: nulls, params, message shapes (no torch)."""

from __future__ import annotations

from tests.unit.test_server import assert_envelope, chat, completion, make_client


def test_null_means_unset_on_every_route() -> None:
    client, engine = make_client()
    nulls = dict.fromkeys(
        (
            "n",
            "stream",
            "logprobs",
            "top_logprobs",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "stream_options",
            "tools",
            "tool_choice",
            "response_format",
            "max_tokens",
            "user",
            "min_tokens",
            "ignore_eos",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
        ),
    )
    reply = chat(client, **nulls)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "hello"
    assert reply.json()["choices"][0]["logprobs"] is None
    assert engine.requests[-1].sampling.n == 1
    message = {"role": "user", "content": "hi", "name": None, "tool_calls": None}
    assert chat(client, messages=[message]).status_code == 200
    legacy = completion(
        client,
        prompt="q: ok",
        echo=None,
        n=None,
        stream=None,
        max_tokens=None,
        logprobs=None,
        suffix=None,
        stream_options=None,
    )
    assert legacy.status_code == 200, legacy.text
    assert legacy.json()["choices"][0]["text"] == "ok"
    assert engine.requests[-1].sampling.max_tokens == 16  # completions' default, as if absent
    response = client.post(
        "/v1/responses",
        json={
            "model": "fake-model",
            "input": "hi",
            "stream": None,
            "store": None,
            "text": None,
            "tools": None,
            "tool_choice": None,
            "temperature": None,
            "instructions": None,
        },
    )
    assert response.status_code == 200, response.text
    formatted = {"model": "fake-model", "input": "hi", "text": {"format": None}}
    assert client.post("/v1/responses", json=formatted).status_code == 200


def test_null_on_a_required_field_is_still_refused() -> None:
    client, _ = make_client()
    assert_envelope(chat(client, messages=None), 400, "messages")
    assert_envelope(chat(client, messages=[{"role": None, "content": "x"}]), 400)


def test_every_openai_message_shape_is_accepted() -> None:
    client, engine = make_client()
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "I cannot."}],
            "refusal": None,
            "audio": None,
        },
        {"role": "assistant", "content": None, "refusal": "No."},
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": "{}"},
        },
        {"role": "function", "name": "get_weather", "content": "sunny"},
        {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
    ]
    reply = chat(client, messages=messages, max_tokens=50)
    assert reply.status_code == 200, reply.text
    prompt = bytes(engine.requests[-1].prompt_token_ids).decode()
    assert "assistant: I cannot." in prompt and "assistant: No." in prompt
    assert "tool: sunny" in prompt  # the deprecated function role, as a tool result


def test_media_parts_are_refused_naming_the_part_and_the_model() -> None:
    client, _ = make_client()
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    content = [{"type": "text", "text": "what is this?"}, image]
    error = assert_envelope(
        chat(client, messages=[{"role": "user", "content": content}]), 400, "messages[0].content[1]"
    )
    assert "'image_url'" in error["message"] and "'fake-model'" in error["message"]
    audio = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    error = assert_envelope(
        chat(client, messages=[{"role": "user", "content": [audio]}]), 400, "messages[0].content[0]"
    )
    assert "'input_audio'" in error["message"]
    item = {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}
    response = client.post("/v1/responses", json={"model": "fake-model", "input": [item]})
    error = assert_envelope(response, 400, "input[0].content[0]")
    assert "'input_image'" in error["message"] and "'fake-model'" in error["message"]
    unknown = [{"type": "hologram", "data": "x"}]
    error = assert_envelope(
        chat(client, messages=[{"role": "user", "content": unknown}]), 400, "messages[0].content[0]"
    )
    assert "content parts must be of type" in error["message"]


def test_responses_accept_refusal_parts_in_history() -> None:
    client, _ = make_client()
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "ok"}]},
    ]
    response = client.post("/v1/responses", json={"model": "fake-model", "input": history})
    assert response.status_code == 200, response.text


async def _leave_early(app, path: str, body: dict) -> list[dict]:
    """Send `body` to `path` as a client that disconnects after 50 ms; the messages sent back."""
    import asyncio
    import json

    sent: list[dict] = []
    request = {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
    messages = [request]

    async def receive() -> dict:
        if messages:
            return messages.pop()
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


def test_disconnects_are_quiet_499s_on_every_route(caplog) -> None:
    import asyncio

    client, engine = make_client()
    engine.delay = 0.02  # 20 ms a token: the answer takes longer than the client waits
    app = client.app
    long = "a long answer that takes a while to generate, one token at a time"
    bodies = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": long}]},
        "/v1/completions": {"prompt": f"q: {long}", "max_tokens": 100},
        "/v1/responses": {"input": long},
    }
    for path, body in bodies.items():
        for stream in (False, True):
            sent = asyncio.run(
                _leave_early(app, path, {"model": "fake-model", **body, "stream": stream})
            )
            statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
            assert statuses in ([], [499], [200]), (path, stream, statuses)
    page = client.get("/metrics").text
    for path in bodies:
        assert f'hearth_http_requests_total{{route="{path}",status="499"}} 2.0' in page, page
        assert f'route="{path}",status="500"' not in page
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert len(set(engine.aborted)) >= 6  # every request was aborted
