"""End to end: `hearth serve` as a subprocess, driven with the official openai SDK."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.server import running_server


@pytest.fixture(scope="module")
def default_server():
    """The shipped models.yaml, as `make serve` runs it."""
    with running_server(timeout=300) as (base_url, proc):
        yield base_url, proc


def test_default_model_answers_paris(default_server) -> None:
    base_url, _ = default_server
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    reply = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_default_model_system_prompt_and_alias(default_server) -> None:
    base_url, _ = default_server
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello."},
        ],
        temperature=0.1,
        seed=5,
        max_tokens=5,
    )
    assert reply.model == "smollm2"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 5


def test_models_and_health(default_server) -> None:
    base_url, _ = default_server
    client = openai.OpenAI(base_url=base_url, api_key="unused")
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct").id == "SmolLM2-135M-Instruct"
    health = httpx.get(base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200


def test_sdk_exceptions_for_errors(default_server) -> None:
    base_url, _ = default_server
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert "SmolLM2-135M-Instruct" in err.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            temperature=7,
            messages=[{"role": "user", "content": "x"}],
        )
    assert bad.value.body["param"] == "temperature"


def test_tiny_model_with_api_key(tiny_llama_dir: Path) -> None:
    with running_server("--model", str(tiny_llama_dir), "--api-key", "s3cret") as (base_url, proc):
        good = openai.OpenAI(base_url=base_url, api_key="s3cret", max_retries=0)
        reply = good.chat.completions.create(
            model=tiny_llama_dir.name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            temperature=0,
        )
        assert reply.usage.completion_tokens <= 4
        bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        log = proc.stdout.read()
    assert "s3cret" not in log
    assert "KV capacity" in log and "ready:" in log
