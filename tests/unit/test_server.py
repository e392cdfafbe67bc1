"""The HTTP layer over a fake engine: envelope errors, auth, models, health, chat (no torch)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine


def make_client(
    keys: tuple[str, ...] = (), ready: bool = True, origins: tuple[str, ...] = ()
) -> tuple[TestClient, FakeEngine]:
    registry = ModelRegistry()
    engine = FakeEngine(aliases=["fake"])
    registry.add(engine)
    if ready:
        registry.mark_ready()
    settings = ServerSettings(api_keys=keys, cors_origins=origins)
    return TestClient(create_app(registry, settings)), engine


def chat(client: TestClient, **body) -> object:
    payload = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], **body}
    return client.post("/v1/chat/completions", json=payload)


def assert_envelope(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_chat_completion_shape_and_usage() -> None:
    client, engine = make_client()
    response = chat(client, temperature=0, max_tokens=50)
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "fake-model"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello", "refusal": None}
    assert choice["finish_reason"] == "stop"
    prompt_len = len(engine.requests[0].prompt_token_ids)
    assert data["usage"] == {
        "prompt_tokens": prompt_len,
        "completion_tokens": 5,
        "total_tokens": prompt_len + 5,
        "completion_tokens_details": {"reasoning_tokens": 0},  # OpenAI's; a thinking model's
        "prompt_tokens_details": {"cached_tokens": 0},  # always reported (the prefix cache)
    }


def test_length_finish_and_alias_and_n() -> None:
    client, _engine = make_client()
    data = chat(client, model="fake", max_tokens=2, n=2).json()
    assert [c["message"]["content"] for c in data["choices"]] == ["he", "he"]
    assert {c["finish_reason"] for c in data["choices"]} == {"length"}
    assert data["usage"]["completion_tokens"] == 4
    assert data["model"] == "fake"


def test_omitted_max_tokens_fills_the_context() -> None:
    client, engine = make_client()
    chat(client)
    request = engine.requests[0]
    assert request.sampling.max_tokens == 256 - len(request.prompt_token_ids)


def test_context_overflow_names_both_numbers() -> None:
    client, _ = make_client()
    error = assert_envelope(chat(client, max_tokens=1000), 400, "max_tokens")
    assert "256" in error["message"] and "1000" in error["message"]
    assert error["code"] == "context_length_exceeded"


def test_validation_errors_are_400_with_param() -> None:
    client, _ = make_client()
    assert_envelope(chat(client, temperature=3), 400, "temperature")
    assert_envelope(chat(client, n=0), 400, "n")
    assert_envelope(
        client.post("/v1/chat/completions", json={"model": "fake-model"}), 400, "messages"
    )
    bad_role = {"model": "fake-model", "messages": [{"role": "wizard", "content": "x"}]}
    assert_envelope(client.post("/v1/chat/completions", json=bad_role), 400, "messages[0].role")


def test_malformed_json_is_400() -> None:
    client, _ = make_client()
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_envelope(response, 400, None)
    assert_envelope(
        client.post(
            "/v1/chat/completions", content=b"[1, 2]", headers={"content-type": "application/json"}
        ),
        400,
    )


def test_unknown_fields_are_ignored() -> None:
    client, _ = make_client()
    assert chat(client, some_vendor_extra={"a": 1}, max_tokens=3).status_code == 200


def test_unknown_model_is_404_listing_ids() -> None:
    client, _ = make_client()
    error = assert_envelope(chat(client, model="gpt-9"), 404, "model")
    assert "fake-model" in error["message"] and error["code"] == "model_not_found"
    assert_envelope(client.get("/v1/models/gpt-9"), 404)
    assert_envelope(client.get("/v1/nowhere"), 404)


def test_models_list_and_get() -> None:
    client, _ = make_client()
    data = client.get("/v1/models").json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["fake-model"]
    assert {"id", "object", "created", "owned_by"} <= set(data["data"][0])
    assert client.get("/v1/models/fake-model").json()["id"] == "fake-model"


def test_health_503_while_loading_and_when_engine_dies() -> None:
    client, engine = make_client(ready=False)
    assert client.get("/health").status_code == 503
    assert_envelope(chat(client), 503)
    client.app.state.registry.mark_ready()
    assert client.get("/health").status_code == 200
    engine.alive = False
    assert client.get("/health").status_code == 503
    assert_envelope(chat(client), 503)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic c2VjcmV0", "Bearer "])
def test_auth_rejects_missing_or_wrong_keys(header: str | None) -> None:
    client, _ = make_client(keys=("secret", "other"))
    headers = {"Authorization": header} if header else {}
    error = assert_envelope(client.get("/v1/models", headers=headers), 401)
    assert error["code"] == "invalid_api_key"
    assert "secret" not in error["message"]


def test_auth_accepts_any_configured_key_and_health_is_open() -> None:
    client, _ = make_client(keys=("secret", "other"))
    for key in ("secret", "other"):
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
    assert client.get("/health").status_code == 200


def sse_events(text: str) -> list[str]:
    """Split an SSE body into its data payloads, checking the framing on the way."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: "), event
        payloads.append(event[len("data: ") :])
    return payloads


def test_chat_stream_framing_role_first_usage_and_done() -> None:
    import json

    client, _ = make_client()
    response = chat(client, stream=True, stream_options={"include_usage": True}, max_tokens=50)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_events(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "hello"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_chat_stream_without_usage_has_no_usage_key() -> None:
    import json

    client, _ = make_client()
    payloads = sse_events(chat(client, stream=True).text)
    assert all("usage" not in json.loads(p) for p in payloads[:-1])


def test_stream_options_without_stream_is_400() -> None:
    client, _ = make_client()
    assert_envelope(chat(client, stream_options={"include_usage": True}), 400, "stream_options")
    assert_envelope(chat(client, top_logprobs=2), 400, "top_logprobs")
    schema_missing = {"type": "json_schema"}
    assert_envelope(
        chat(client, response_format=schema_missing), 400, "response_format.json_schema"
    )
    stream_options = {"include_usage": True}
    assert_envelope(
        completion(client, prompt="x", stream_options=stream_options), 400, "stream_options"
    )


def completion(client: TestClient, **body) -> object:
    return client.post("/v1/completions", json={"model": "fake-model", **body})


def test_completions_prompt_forms_echo_and_n() -> None:
    client, _ = make_client()
    data = completion(client, prompt="say: hi", max_tokens=10).json()
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["choices"][0]["text"] == "hi" and data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == len("say: hi")
    many = completion(client, prompt=["a: xy", "b: z"], n=2, max_tokens=10).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in many["choices"]] == ["xy", "xy", "z", "z"]
    ids = completion(client, prompt=list(b"q: ok"), max_tokens=10).json()
    assert ids["choices"][0]["text"] == "ok"
    nested = completion(client, prompt=[list(b"q: ab"), list(b"q: cd")], max_tokens=10).json()
    assert [c["text"] for c in nested["choices"]] == ["ab", "cd"]
    echoed = completion(client, prompt="e: yes", echo=True, max_tokens=10).json()
    assert echoed["choices"][0]["text"] == "e: yesyes"
    cut = completion(client, prompt="l: long answer", max_tokens=3).json()
    assert cut["choices"][0]["text"] == "lon" and cut["choices"][0]["finish_reason"] == "length"


def test_completions_default_max_tokens_is_16_and_errors() -> None:
    client, engine = make_client()
    completion(client, prompt="x: y")
    assert engine.requests[-1].sampling.max_tokens == 16
    error = assert_envelope(completion(client, prompt="x", suffix="tail"), 400, "suffix")
    assert "not supported" in error["message"]
    assert_envelope(completion(client, prompt=[]), 400, "prompt")
    assert_envelope(completion(client, prompt="x", max_tokens=10_000), 400, "max_tokens")


def test_completions_stream() -> None:
    import json

    client, _ = make_client()
    body = {
        "prompt": ["a: one", "b: two"],
        "stream": True,
        "echo": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 10,
    }
    payloads = sse_events(completion(client, **body).text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "a: oneone", 1: "b: twotwo"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_huge_prompt_is_rejected_before_tokenizing() -> None:
    client, engine = make_client()
    calls = []
    engine.encode_chat = lambda *a, **k: calls.append(1)  # must not be reached
    error = assert_envelope(
        chat(client, messages=[{"role": "user", "content": "x" * 1_000_000}]), 400, "messages"
    )
    assert "maximum context length is 256" in error["message"] and not calls


def test_queue_full_is_429_with_retry_after() -> None:
    from hearth.engine.types import QueueFullError

    client, engine = make_client()

    async def full(request):
        raise QueueFullError("1024 requests are in flight")
        yield  # pragma: no cover

    engine.generate = full
    response = chat(client)
    assert_envelope(response, 429)
    assert response.headers["retry-after"] == "1"


def test_an_unexpected_engine_error_is_a_500_with_a_logged_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only an InvalidRequestError is the client's (400): a ValueError in the engine is a bug."""
    import logging

    client, engine = make_client()
    client = TestClient(client.app, raise_server_exceptions=False)

    def bug(*args, **kwargs):
        raise ValueError("bug")

    async def buggy_generate(request):
        raise ValueError("bug")
        yield  # pragma: no cover

    for attribute, fault in (("generate", buggy_generate), ("encode_chat", bug)):
        real = getattr(engine, attribute)
        setattr(engine, attribute, fault)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="hearth.server"):
            for stream in (False, True):
                error = assert_envelope(chat(client, stream=stream), 500)
                assert error["type"] == "server_error"
        assert "Traceback" in caplog.text and "ValueError: bug" in caplog.text
        setattr(engine, attribute, real)
    assert chat(client).status_code == 200


def test_an_invalid_request_error_is_a_400_naming_its_param() -> None:
    from hearth.engine.types import InvalidRequestError

    client, engine = make_client()

    async def refuse(request):
        raise InvalidRequestError("the messages cannot be served", param="messages")
        yield  # pragma: no cover

    engine.generate = refuse
    error = assert_envelope(chat(client), 400, "messages")
    assert error["message"] == "the messages cannot be served"
    assert error["type"] == "invalid_request_error"

    def bad_template(*args, **kwargs):
        raise InvalidRequestError("no tools here", param="tools")

    engine.encode_chat = bad_template
    assert_envelope(chat(client, stream=True), 400, "tools")
    engine.encode_chat = lambda *a, **k: (_ for _ in ()).throw(InvalidRequestError("bad"))
    assert_envelope(chat(client), 400, "messages")  # no param of its own: the field tokenized


def test_an_invalid_request_error_anywhere_in_a_route_is_a_400() -> None:
    """One app-wide handler: an InvalidRequestError no route caught (e.g. SamplingParams built
    outside the engine calls) is still the client's 400 naming its param, never a 500."""
    from fastapi import FastAPI

    from hearth.engine.types import InvalidRequestError
    from hearth.server.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.post("/refuse")
    async def refuse() -> None:
        raise InvalidRequestError("temperature must be in [0, 2]", param="temperature")

    response = TestClient(app).post("/refuse")
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": "temperature must be in [0, 2]",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": None,
        }
    }


def test_engine_error_mid_stream_is_an_error_event_then_done() -> None:
    import json

    from hearth.engine.types import GenerationOutput

    client, engine = make_client()

    async def failing(request):
        yield GenerationOutput(request.request_id, 0, [104], "h", 3, 1)
        yield GenerationOutput(request.request_id, 0, [], "", 3, 1, "error", error="boom")

    engine.generate = failing
    payloads = sse_events(chat(client, stream=True).text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["message"] == "boom" and error["type"] == "server_error"
    assert_envelope(chat(client), 500)


def test_requests_ended_by_shutdown_are_503() -> None:
    """A drain that runs out of time ends requests with a retryable error: 503, not 500."""
    from hearth.engine.types import GenerationOutput

    client, engine = make_client()

    async def shutting_down(request):
        yield GenerationOutput(
            request.request_id, 0, [], "", 3, 0, "error", error="shutting down", retryable=True
        )

    engine.generate = shutting_down
    assert assert_envelope(chat(client), 503)["code"] == "service_unavailable"


def test_metrics_exposes_requests_tokens_and_engine_gauges() -> None:
    client, _ = make_client()
    chat(client, max_tokens=50)
    chat(client, model="nope")
    text = client.get("/metrics").text
    assert 'hearth_http_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'hearth_http_requests_total{route="/v1/chat/completions",status="404"} 1.0' in text
    assert 'hearth_generation_tokens_total{model="fake-model"} 5.0' in text
    assert "hearth_time_to_first_token_seconds_count" in text
    assert 'hearth_kv_cache_usage_ratio{model="fake-model"}' in text
    assert 'hearth_requests_running{model="fake-model"} 0.0' in text


def test_cors_is_off_by_default_and_configurable() -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    closed, _ = make_client()
    response = closed.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    open_, _ = make_client(origins=("https://app.example",))
    response = open_.options("/v1/chat/completions", headers=preflight)
    assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_top_p_zero_is_accepted_as_greedy() -> None:
    client, engine = make_client()
    assert chat(client, top_p=0, max_tokens=3).status_code == 200
    assert engine.requests[-1].sampling.greedy
    assert_envelope(chat(client, top_p=1.5), 400, "top_p")


def test_a_stop_signal_turns_the_server_to_draining() -> None:
    import signal

    import uvicorn

    from hearth.server.lifecycle import DrainingServer

    client, _ = make_client()
    registry = client.app.state.registry
    server = DrainingServer(uvicorn.Config(client.app), registry)
    server.handle_exit(signal.SIGTERM, None)
    assert registry.state == "draining" and not server.should_exit  # still answering: 503
    assert client.get("/health").status_code == 503
    assert_envelope(chat(client), 503)
    registry.mark_ready()  # a model that finishes loading now does not undo the drain
    assert registry.state == "draining"
    registry.in_flight = 1
    server.drain_step()
    assert not server.should_exit
    registry.in_flight = 0
    server.drain_step()
    assert server.should_exit
