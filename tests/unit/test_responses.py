"""The Responses API: objects, streams, the store and previous_response_id (fake engine, SDK)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response

from hearth.engine.types import GenerationOutput, GenerationRequest
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.responses.store import MemoryResponseStore
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine

EVENT_ORDER = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


class FailingEngine(FakeEngine):
    """Generates one token, then fails the request."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        self.requests.append(request)
        n = len(request.prompt_token_ids)
        yield GenerationOutput(request.request_id, 0, [104], "h", n, 1)
        yield GenerationOutput(request.request_id, 0, [], "", n, 1, "error", error="GPU fell over")


def make_client(engine: FakeEngine | None = None, **settings: Any) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine()
    registry = ModelRegistry()
    registry.add(engine)
    registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(**settings))), engine


def create(client: TestClient, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": "fake-model", "input": "hello", **body})


def prompt_of(engine: FakeEngine) -> str:
    return engine.decode(engine.requests[-1].prompt_token_ids)


def events_of(text: str) -> list[tuple[str, dict]]:
    """(event line, parsed data) per SSE event; checks each event's framing."""
    events = []
    for block in text.split("\n\n"):
        if not block:
            continue
        head, data = block.split("\n")
        assert head.startswith("event: ") and data.startswith("data: ")
        events.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    return events


def assert_envelope(response: Any, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    return error


def sdk(client: TestClient) -> openai.OpenAI:
    """The official SDK, sending through the in-process app."""
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0
    )


def test_string_input_object_shape_and_exact_usage() -> None:
    client, engine = make_client()
    response = create(client, temperature=0)
    assert response.status_code == 200
    data = response.json()
    parsed = Response.model_validate(data)  # every field the SDK requires, with its type
    assert parsed.output_text == "hello"
    assert data["id"].startswith("resp_") and data["object"] == "response"
    assert data["status"] == "completed" and data["incomplete_details"] is None
    assert data["error"] is None and data["model"] == "fake-model"
    [item] = data["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [
        {"type": "output_text", "text": "hello", "annotations": [], "logprobs": []}
    ]
    assert prompt_of(engine) == "user: hello\n"
    prompt_len = len(engine.requests[-1].prompt_token_ids)
    assert data["usage"] == {
        "input_tokens": prompt_len,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_len + 5,
    }
    assert data["temperature"] == 0 and engine.requests[-1].sampling.temperature == 0
    assert data["store"] is True and data["tools"] == [] and data["metadata"] == {}


def test_list_input_roles_and_content_parts() -> None:
    client, engine = make_client()
    items = [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "b", "x": 1}]},
        {
            "role": "user",
            "content": [{"type": "input_text", "text": "c"}, {"type": "input_text", "text": "d"}],
        },
    ]
    data = create(client, input=items).json()
    assert prompt_of(engine) == "system: rules\nuser: a\nassistant: b\nuser: cd\n"
    assert data["output"][0]["content"][0]["text"] == "cd"


def test_instructions_lead_as_a_system_message() -> None:
    client, engine = make_client()
    data = create(client, instructions="Be brief.", input="hi").json()
    assert prompt_of(engine) == "system: Be brief.\nuser: hi\n"
    assert data["instructions"] == "Be brief."


def test_max_output_tokens_cut_is_incomplete() -> None:
    client, engine = make_client()
    data = create(client, max_output_tokens=2).json()
    assert engine.requests[-1].sampling.max_tokens == 2
    assert data["status"] == "incomplete"
    assert data["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["output"][0]["status"] == "incomplete"
    assert data["output"][0]["content"][0]["text"] == "he"
    assert data["usage"]["output_tokens"] == 2 and data["max_output_tokens"] == 2


def test_omitted_max_output_tokens_fills_the_context_and_overflow_is_400() -> None:
    client, engine = make_client()
    create(client)
    request = engine.requests[-1]
    assert request.sampling.max_tokens == 256 - len(request.prompt_token_ids)
    error = assert_envelope(create(client, max_output_tokens=1000), 400, "max_output_tokens")
    assert "256" in error["message"] and "1000" in error["message"]


def test_model_defaults_apply_where_the_request_is_silent() -> None:
    engine = FakeEngine()
    engine.info.default_sampling = {"temperature": 0.3, "top_k": 5}
    client, _ = make_client(engine)
    data = create(client).json()
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_k, data["temperature"]) == (0.3, 5, 0.3)
    create(client, temperature=1.5, top_p=0.5)
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p) == (1.5, 0.5)


def test_stream_events_in_order_with_increasing_sequence_numbers() -> None:
    client, engine = make_client()
    response = create(client, stream=True, input="hey there")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in response.text
    events = events_of(response.text)
    kinds = [kind for kind, _ in events]
    deltas = [data["delta"] for kind, data in events if kind == "response.output_text.delta"]
    assert kinds == EVENT_ORDER[:4] + ["response.output_text.delta"] * 9 + [
        *EVENT_ORDER[5:],
        "response.completed",
    ]
    assert all(data["type"] == kind for kind, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    text = final["output"][0]["content"][0]["text"]
    assert "".join(deltas) == text == "hey there"
    assert final["status"] == "completed"
    assert final["usage"]["output_tokens"] == 9
    assert final["usage"]["input_tokens"] == len(engine.requests[-1].prompt_token_ids)
    item_id = final["output"][0]["id"]
    assert {d["item_id"] for _, d in events[3:-2]} == {item_id}
    assert events[0][1]["response"]["status"] == "in_progress"
    assert client.get(f"/v1/responses/{final['id']}").json() == final


def test_stream_cut_by_max_output_tokens_ends_incomplete() -> None:
    client, _ = make_client()
    events = events_of(create(client, stream=True, max_output_tokens=3).text)
    kind, data = events[-1]
    assert kind == "response.incomplete"
    assert data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert data["response"]["output"][0]["content"][0]["text"] == "hel"


def test_engine_failure_mid_stream_becomes_response_failed() -> None:
    client, _ = make_client(FailingEngine())
    events = events_of(create(client, stream=True).text)
    assert [kind for kind, _ in events] == [*EVENT_ORDER[:5], "response.failed"]
    failed = events[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "GPU fell over"}
    assert client.get(f"/v1/responses/{failed['id']}").status_code == 404
    error = assert_envelope(create(client), 500, None)
    assert error["message"] == "GPU fell over"


def test_store_get_delete_then_404() -> None:
    client, _ = make_client()
    created = create(client, metadata={"k": "v"}).json()
    path = f"/v1/responses/{created['id']}"
    assert client.get(path).json() == created
    assert created["metadata"] == {"k": "v"}
    deleted = client.delete(path)
    assert deleted.json() == {"id": created["id"], "object": "response.deleted", "deleted": True}
    assert_envelope(client.get(path), 404, None)
    assert_envelope(client.delete(path), 404, None)


def test_store_false_is_not_retrievable_nor_continuable() -> None:
    client, _ = make_client()
    created = create(client, store=False).json()
    assert created["store"] is False
    assert_envelope(client.get(f"/v1/responses/{created['id']}"), 404, None)
    unknown = create(client, previous_response_id=created["id"])
    assert_envelope(unknown, 404, "previous_response_id")


def test_previous_response_id_puts_earlier_turns_in_the_prompt() -> None:
    client, engine = make_client()
    first = create(client, input="one", instructions="Old rules.").json()
    second = create(client, input="two", previous_response_id=first["id"]).json()
    assert prompt_of(engine) == "user: one\nassistant: one\nuser: two\n"  # instructions not kept
    assert second["previous_response_id"] == first["id"]
    create(client, input="three", instructions="New.", previous_response_id=second["id"])
    expected = "system: New.\nuser: one\nassistant: one\nuser: two\nassistant: two\nuser: three\n"
    assert prompt_of(engine) == expected


def test_unknown_previous_response_id_is_404_with_param() -> None:
    client, engine = make_client()
    error = assert_envelope(
        create(client, previous_response_id="resp_nope"), 404, "previous_response_id"
    )
    assert "resp_nope" in error["message"]
    assert engine.requests == []


def test_store_is_bounded_by_settings() -> None:
    client, _ = make_client(responses_max_stored=2)
    ids = [create(client, input=f"m{i}").json()["id"] for i in range(3)]
    assert client.get(f"/v1/responses/{ids[0]}").status_code == 404
    assert [client.get(f"/v1/responses/{i}").status_code for i in ids[1:]] == [200, 200]


def test_response_store_evicts_oldest_and_expired() -> None:
    now = [0.0]
    store = MemoryResponseStore(max_size=2, ttl_s=10, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put({"id": name}, [])
    assert store.get("a") is None and len(store) == 2
    now[0] = 5
    store.put({"id": "d"}, [{"role": "user", "content": "x"}])  # evicts b
    now[0] = 10  # c has expired, d has not
    assert (store.get("b"), store.get("c")) == (None, None)
    assert store.get("d").messages == [{"role": "user", "content": "x"}]
    assert store.pop("d") is not None and len(store) == 0


def test_validation_errors_are_400_with_param() -> None:
    client, _ = make_client()
    assert_envelope(create(client, temperature=5), 400, "temperature")
    assert_envelope(create(client, top_p=1.5), 400, "top_p")
    assert_envelope(create(client, max_output_tokens=0), 400, "max_output_tokens")
    assert_envelope(create(client, input=[]), 400, "input")
    missing = client.post("/v1/responses", json={"model": "fake-model"})
    assert_envelope(missing, 400, "input")
    unknown = [{"type": "web_search_call", "id": "ws_1"}]  # not an item hearth takes
    error = assert_envelope(create(client, input=unknown), 400, "input[0]")
    assert "reasoning" in error["message"] and "function_call_output" in error["message"]
    odd = [{"type": ["message"], "role": "user", "content": "x"}]
    assert_envelope(create(client, input=odd), 400, "input[0]")
    call = [{"type": "function_call", "call_id": "c1", "name": "f"}]  # no arguments
    assert_envelope(create(client, input=call), 400, "input[0].arguments")
    image = [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]
    error = assert_envelope(create(client, input=image), 400, "input[0].content[0]")
    assert "'input_image'" in error["message"]  # a valid shape, refused by a text-only model
    assert_envelope(
        create(client, input=[{"role": "wizard", "content": "x"}]), 400, "input[0].role"
    )
    assert_envelope(create(client, model="gpt-9"), 404, "model")


def test_unknown_fields_are_ignored() -> None:
    client, _ = make_client()
    response = create(client, reasoning={"effort": "low"}, truncation="auto", vendor_extra=[1])
    assert response.status_code == 200
    assert response.json()["output"][0]["content"][0]["text"] == "hello"


def test_routes_require_the_api_key() -> None:
    client, _ = make_client(api_keys=("secret",))
    assert create(client).status_code == 401
    assert client.get("/v1/responses/resp_x").status_code == 401
    assert client.delete("/v1/responses/resp_x").status_code == 401
    client.headers["Authorization"] = "Bearer secret"
    created = create(client).json()
    assert client.get(f"/v1/responses/{created['id']}").status_code == 200
    assert client.delete(f"/v1/responses/{created['id']}").status_code == 200


def test_sdk_parses_everything_in_process() -> None:
    client, _ = make_client()
    api = sdk(client)
    created = api.responses.create(model="fake-model", input="hello there")
    assert created.output_text == "hello there" and created.status == "completed"
    assert api.responses.retrieve(created.id).output_text == "hello there"
    events = list(api.responses.create(model="fake-model", input="abc", stream=True))
    assert [e.type for e in events][-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    with api.responses.stream(
        model="fake-model", input="xyz", previous_response_id=created.id
    ) as s:
        deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert "".join(deltas) == final.output_text == "xyz"
    assert final.usage.output_tokens == 3
    api.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        api.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as err:
        api.responses.create(model="fake-model", input="x", previous_response_id=created.id)
    assert err.value.body["param"] == "previous_response_id"
