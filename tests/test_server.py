"""The HTTP layer over a fake engine: envelope errors, auth, models, health, chat (no torch)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.registry import ModelRegistry
from server.settings import ServerSettings
from tests.fakes import FakeEngine


def make_client(keys: tuple[str, ...] = (), ready: bool = True) -> tuple[TestClient, FakeEngine]:
    registry = ModelRegistry()
    engine = FakeEngine(aliases=["fake"])
    registry.add(engine)
    if ready:
        registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(api_keys=keys))), engine


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
