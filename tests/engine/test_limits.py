"""Request limits in process: body size (413), n, stop strings, the request timeout, model ids."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_server import assert_envelope


def client_with(engine=None, **settings) -> TestClient:
    registry = ModelRegistry()
    registry.add(engine or FakeEngine())
    registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(**settings)))


def chat_body(**fields) -> dict:
    return {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_oversized_bodies_are_413_before_parsing() -> None:
    client = client_with(max_body_bytes=2000)
    small = chat_body(max_tokens=2)
    assert client.post("/v1/chat/completions", json=small).status_code == 200
    big = chat_body(messages=[{"role": "user", "content": "x" * 5000}])
    error = assert_envelope(client.post("/v1/chat/completions", json=big), 413)
    assert error["code"] == "request_too_large" and "2000" in error["message"]
    chunks = (json.dumps(big).encode()[i : i + 500] for i in range(0, 6000, 500))
    chunked = client.post(  # no content-length: counted while read
        "/v1/chat/completions", content=chunks, headers={"content-type": "application/json"}
    )
    assert_envelope(chunked, 413)
    assert client.post("/v1/chat/completions", json=small).status_code == 200


def test_default_limit_refuses_ten_megabytes() -> None:
    client = client_with()
    started = time.perf_counter()
    response = client.post("/v1/completions", json={"model": "fake-model", "prompt": "x" * 10**7})
    assert_envelope(response, 413)
    assert time.perf_counter() - started < 2


def test_n_and_stop_limits() -> None:
    client = client_with(max_n=4)
    assert client.post("/v1/chat/completions", json=chat_body(n=4, max_tokens=1)).status_code == 200
    assert_envelope(client.post("/v1/chat/completions", json=chat_body(n=5)), 400, "n")
    prompt = {"model": "fake-model", "prompt": "x", "n": 9}
    assert_envelope(client.post("/v1/completions", json=prompt), 400, "n")
    long_stop = chat_body(stop=["y" * 257])
    assert_envelope(client.post("/v1/chat/completions", json=long_stop), 400, "stop")
    many = chat_body(stop=["a", "b", "c", "d", "e"])
    assert_envelope(client.post("/v1/chat/completions", json=many), 400, "stop")


def test_max_tokens_beyond_the_context_is_400() -> None:
    client = client_with()
    error = assert_envelope(
        client.post("/v1/chat/completions", json=chat_body(max_tokens=257)), 400, "max_tokens"
    )
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    "model", ["../../etc/passwd", "/etc/passwd", "..%2F..%2Fetc%2Fpasswd", "~/.ssh/id_rsa"]
)
def test_model_ids_never_reach_the_filesystem(model: str) -> None:
    client = client_with()
    opened: list[str] = []
    watching = True

    def audit(event: str, args: tuple) -> None:
        if watching and event in ("open", "os.listdir", "os.scandir") and args:
            opened.append(str(args[0]))

    sys.addaudithook(audit)  # hooks cannot be removed: `watching` switches it off
    try:
        post = client.post("/v1/chat/completions", json=chat_body(model=model))
        get = client.get(f"/v1/models/{model}")
    finally:
        watching = False
    assert_envelope(post, 404, "model")
    assert get.status_code == 404
    assert not [path for path in opened if "passwd" in path or "ssh" in path]


def test_trust_remote_code_is_off_unless_the_config_sets_it(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading import loader
    from hearth.engine.loading.sources import resolve_source

    seen: list[object] = []
    real = loader.AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader.AutoConfig, "from_pretrained", spy)
    for extra, expected in (({}, False), ({"trust_remote_code": True}, True)):
        config = ModelConfig(id="t", source=str(tiny_llama_dir), device="cpu", **extra)
        loader.load_model(config, resolve_source(config.source))
        assert seen[-1] is expected


def test_request_timeout_aborts_the_engine_request(tiny_llama_dir: Path) -> None:
    from tests.engine.test_engine import start_engine

    engine = start_engine(tiny_llama_dir)
    execute = engine.core.runner.execute

    def slow(scheduled):
        time.sleep(0.01)
        return execute(scheduled)

    engine.core.runner.execute = slow
    try:
        client = client_with(engine, request_timeout_s=0.5)
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 400, "ignore_eos": True}
        started = time.perf_counter()
        error = assert_envelope(client.post("/v1/completions", json=body), 504)
        assert error["code"] == "request_timeout" and time.perf_counter() - started < 3
        events = client.post("/v1/completions", json={**body, "stream": True}).text
        payloads = [e.removeprefix("data: ") for e in events.strip().split("\n\n")]
        assert payloads[-1] == "[DONE]"
        assert json.loads(payloads[-2])["error"]["code"] == "request_timeout"
        short = client.post("/v1/completions", json={**body, "max_tokens": 3})
        assert short.status_code == 200
        stats = engine.stats()
        assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    finally:
        engine.shutdown()
