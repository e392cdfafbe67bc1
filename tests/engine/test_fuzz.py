"""Schemathesis over the app's OpenAPI: no 5xx, every 4xx in OpenAI's envelope (Anthropic's on
/v1/messages) (bounded run)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from tests.fixtures.fakes import FakeEngine

STATUSES: collections.Counter[str] = collections.Counter()


def app_over(engine) -> object:
    registry = ModelRegistry()
    registry.add(engine)
    registry.mark_ready()
    return create_app(registry)


def check(case: schemathesis.Case, label: str) -> None:
    response = case.call()
    STATUSES[f"{label} {case.method} {case.path} {response.status_code}"] += 1
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400 and case.path.startswith("/v1/messages"):
        body = json.loads(response.text)
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    elif response.status_code >= 400:
        error = json.loads(response.text)["error"]
        assert set(error) == {"message", "type", "param", "code"}, response.text
        assert isinstance(error["message"], str) and error["message"]


def test_the_schema_describes_every_v1_request_body() -> None:
    spec = app_over(FakeEngine()).openapi()
    posts = {path for path, ops in spec["paths"].items() if "post" in ops}
    assert posts == {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/rerank",
        "/rerank",
        "/v2/rerank",
        "/score",
        "/v1/score",
        "/tokenize",
        "/detokenize",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/load_model",
        "/v1/unload_model",
        "/v1/responses/{response_id}/cancel",
        "/v1/files",
        "/v1/batches",
        "/v1/batches/{batch_id}/cancel",
        "/v1/messages",
        "/v1/messages/count_tokens",
    }
    for path in posts - {"/v1/responses/{response_id}/cancel", "/v1/batches/{batch_id}/cancel"}:
        assert spec["paths"][path]["post"]["requestBody"]["required"]


FAKE = schemathesis.openapi.from_asgi("/openapi.json", app_over(FakeEngine()))
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


@FAKE.parametrize()
@FUZZ
def test_fuzz_over_the_fake_engine(case: schemathesis.Case) -> None:
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = case.path_parameters["model_id"] or "x"
    check(case, "fake")


TINY_REGISTRY = ModelRegistry()  # filled by the tiny_engine fixture; the schema needs no engine
TINY = schemathesis.openapi.from_asgi("/openapi.json", create_app(TINY_REGISTRY)).include(
    method="POST"
)


@pytest.fixture(scope="module")
def tiny_engine(tiny_llama_dir: Path):
    """The real engine on the tiny model with a 32-token context, so any request is cheap."""
    from hearth.engine.builder import build_engine
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import load_model
    from hearth.engine.loading.sources import resolve_source

    config = ModelConfig(
        id="fake-model",
        source=str(tiny_llama_dir),
        device="cpu",
        max_model_len=32,
        engine={"kv_cache_memory": "16MiB"},
    )
    engine = build_engine(load_model(config, resolve_source(config.source)))
    TINY_REGISTRY.add(engine)
    TINY_REGISTRY.mark_ready()
    yield engine
    engine.shutdown()


@TINY.parametrize()
@settings(FUZZ, max_examples=20)
def test_fuzz_over_the_tiny_engine(case: schemathesis.Case, tiny_engine) -> None:
    if isinstance(case.body, dict):
        case.body["model"] = "fake-model"  # reach the engine, not only the 404
    check(case, "tiny")
    assert tiny_engine.is_alive, "a request killed the engine"


def test_zz_report_fuzz_counts() -> None:
    """Prints what the fuzz runs saw (the numbers in docs/reliability.md)."""
    by_status = collections.Counter()
    for key, count in STATUSES.items():
        by_status[f"{key.split()[0]} {key.rsplit(maxsplit=1)[1]}"] += count
    print("fuzz responses by engine and status:", dict(sorted(by_status.items())))
    if STATUSES:
        assert not [k for k in STATUSES if k.rsplit(maxsplit=1)[1].startswith("5")]
