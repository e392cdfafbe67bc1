"""The Responses API: objects, streams, the store and previous_response_id (fake engine, SDK)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fixtures.server import running_server
from tests.unit.test_responses import EVENT_ORDER

# -- a live server on the tiny random model ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir: Path) -> Iterator[tuple[openai.OpenAI, str]]:
    with running_server("--model", str(tiny_llama_dir)) as (base_url, _proc):
        yield openai.OpenAI(base_url=base_url, api_key="x", max_retries=0), tiny_llama_dir.name


def test_live_create_retrieve_delete(tiny_server: tuple[openai.OpenAI, str]) -> None:
    client, model = tiny_server
    created = client.responses.create(model=model, input="hi", max_output_tokens=8)
    assert isinstance(created.output_text, str)
    assert 0 < created.usage.output_tokens <= 8
    assert created.status in ("completed", "incomplete")
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    fetched = client.responses.retrieve(created.id)
    assert (fetched.id, fetched.output_text) == (created.id, created.output_text)
    follow = client.responses.create(
        model=model, input="again", previous_response_id=created.id, max_output_tokens=4
    )
    assert follow.usage.input_tokens > created.usage.input_tokens  # the earlier turn is in it
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=model, input="x", previous_response_id=created.id)
    assert err.value.body["param"] == "previous_response_id"


def test_live_stream_yields_typed_events(tiny_server: tuple[openai.OpenAI, str]) -> None:
    client, model = tiny_server
    events = list(
        client.responses.create(model=model, input="hi", max_output_tokens=6, stream=True)
    )
    assert [e.type for e in events[:4]] == EVENT_ORDER[:4]
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text
    assert final.usage.output_tokens <= 6
