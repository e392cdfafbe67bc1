"""Item 8 of issue 28 on the wire: usage.prompt_tokens_details.cached_tokens (chat, completions)
and usage.input_tokens_details.cached_tokens (Responses), streamed or not, always reported."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

from hearth.engine.types import GenerationOutput, GenerationRequest
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import create, make_client


class CachingEngine(FakeEngine):
    """Says the first 4 prompt tokens came from the prefix cache."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        async for output in super().generate(request):
            yield dataclasses.replace(output, num_cached_tokens=4)


def events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def test_cached_tokens_on_every_route() -> None:
    client, _ = make_client(CachingEngine())
    messages = [{"role": "user", "content": "hello"}]
    reply = client.post("/v1/chat/completions", json={"model": "fake-model", "messages": messages})
    assert reply.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    streamed = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert events(streamed.text)[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    legacy = client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": ["q: a", "q: b"]}
    )
    assert legacy.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}  # 2 prompts
    body = {"model": "fake-model", "prompt": ["q: a", "q: b"], "stream": True}
    body["stream_options"] = {"include_usage": True}
    streamed = client.post("/v1/completions", json=body)
    assert events(streamed.text)[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    response = create(client, input="hi").json()
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 4
    streamed = create(client, input="hi", stream=True)
    final = events(streamed.text)[-1]["response"]
    assert final["usage"]["input_tokens_details"]["cached_tokens"] == 4


def test_zero_is_reported_too() -> None:
    client, _ = make_client()
    legacy = client.post("/v1/completions", json={"model": "fake-model", "prompt": "q: a"})
    assert legacy.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    response = create(client, input="hi").json()
    assert response["usage"]["input_tokens_details"]["cached_tokens"] == 0
