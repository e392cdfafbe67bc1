"""Item 9 of issue 28: liveness fails once an engine thread has died; background responses have
a deadline and a concurrency cap of their own; an adapter unloaded and reloaded under the same
name never serves a request that resolved the old one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient

from hearth.engine.types import GenerationOutput, GenerationRequest, SamplingParams, ended_output
from hearth.server.app import create_app
from hearth.server.errors import APIError
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import create
from tests.unit.test_server import assert_envelope


def app_client(engine: FakeEngine, ready: bool = True, **settings) -> TestClient:
    registry = ModelRegistry()
    registry.add(engine)
    if ready:
        registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(**settings)))


def test_liveness_fails_once_an_engine_thread_died() -> None:
    engine = FakeEngine()
    client = app_client(engine)
    assert client.get("/health/live").status_code == 200
    engine.alive = False  # the engine thread has ended
    reply = client.get("/health/live")
    assert reply.status_code == 503 and reply.json()["models"] == ["fake-model"]
    assert client.get("/health").status_code == 503
    loading = app_client(FakeEngine(), ready=False)  # loading is not dead: the startup probe
    assert loading.get("/health/live").status_code == 200
    assert loading.get("/health").status_code == 503


def poll(client: TestClient, response_id: str, *statuses: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        body = client.get(f"/v1/responses/{response_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.02)
    raise AssertionError(f"{response_id} never reached {statuses}: {body['status']}")


class AbortingFake(FakeEngine):
    """Ends a sample with finish_reason "abort" once its request is aborted (as the engine)."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        async for output in super().generate(request):
            if request.request_id in self.aborted:
                yield ended_output(request.request_id, output.index, "abort")
                return
            yield output


def test_background_responses_have_a_deadline_of_their_own() -> None:
    engine = AbortingFake()
    engine.delay = 0.05
    with app_client(engine, background_timeout_s=0.3, request_timeout_s=None) as client:
        queued = create(client, input="x" * 200, background=True).json()
        failed = poll(client, queued["id"], "failed", "completed")
        assert failed["status"] == "failed"
        assert "timeout" in failed["error"]["message"]
        assert queued["id"] in engine.aborted


def test_background_responses_have_a_concurrency_cap() -> None:
    engine = FakeEngine()
    engine.delay = 0.05
    with app_client(engine, max_background_runs=1) as client:
        first = create(client, input="y" * 100, background=True).json()
        error = assert_envelope(create(client, input="z", background=True), 429, "background")
        assert "at most 1" in error["message"]
        assert create(client, input="fg").status_code == 200  # the foreground is not capped
        client.post(f"/v1/responses/{first['id']}/cancel")
        assert create(client, input="z", background=True).status_code == 200


class LoraFake(FakeEngine):
    """Loads adapters by name; remembers which path each name has now."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: dict[str, str] = {}

    async def load_lora(self, name: str, source: str) -> None:
        self.loaded[name] = source

    def unload_lora(self, name: str) -> bool:
        return self.loaded.pop(name, None) is not None


def test_a_reloaded_adapter_never_serves_a_request_of_the_old_one() -> None:
    engine = LoraFake()
    client = app_client(engine, allow_runtime_lora=True)
    registry: ModelRegistry = client.app.state.registry

    def load(path: str) -> None:
        reply = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": path})
        assert reply.status_code == 200, reply.text

    load("/old")
    resolved = registry.get("a")  # a request resolved the adapter, then was still tokenizing...
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 200
    load("/new")  # ...while it was unloaded and another loaded under the same name

    async def run(view) -> list:
        request = GenerationRequest("r", [104, 105], SamplingParams(max_tokens=2))
        return [out async for out in view.generate(request)]

    with pytest.raises(APIError) as caught:
        asyncio.run(run(resolved))
    assert caught.value.status == 404 and caught.value.param == "model"
    assert engine.requests == []  # it never reached the engine
    assert asyncio.run(run(registry.get("a")))  # the new one serves
    assert engine.requests[-1].sampling.lora == "a"
    assert resolved.in_flight == 0
