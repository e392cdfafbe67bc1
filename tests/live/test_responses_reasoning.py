"""Reasoning models on the Responses API (issue 17): the `reasoning` output item before the
answer, its stream events, reasoning_tokens, reasoning sent back as input and carried by
previous_response_id, and the request's reasoning controls (fake engine; one live test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fixtures.server import running_server, thinking_config

# -- a live server: the tiny random model with an R1-distill template ------------------------------


@pytest.fixture(scope="module")
def thinking_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("thinking")
    config = thinking_config(tmp / "models.yaml", tiny_llama_dir, "r1_distill_style")
    with running_server("--config", str(config)) as (base_url, _proc):
        yield openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)


@pytest.mark.slow
def test_live_reasoning_item_and_tokens(thinking_server: openai.OpenAI) -> None:
    response = thinking_server.responses.create(
        model="tiny", input="hi", max_output_tokens=40, temperature=0
    )
    reasoning = response.output[0]  # the template opened the block: the output starts in it
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= 40
    assert response.output[-1].type == "message"
    events = list(  # the SDK's typed events (responses.stream wants response.completed)
        thinking_server.responses.create(
            model="tiny", input="hi", max_output_tokens=40, temperature=0, stream=True
        )
    )
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    final = events[-1].response
    assert events[2].type == "response.output_item.added" and events[2].item.type == "reasoning"
    assert deltas == final.output[0].content[0].text == reasoning.content[0].text


@pytest.mark.slow
def test_live_reasoning_budget_closes_the_block(thinking_server: openai.OpenAI) -> None:
    response = thinking_server.responses.create(
        model="tiny",
        input="hi",
        max_output_tokens=40,
        temperature=0,
        extra_body={"max_reasoning_tokens": 8},
    )
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content[0].text
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= 8 + 4  # + the close


@pytest.mark.slow
def test_live_budget_then_json_answer(thinking_server: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    response = thinking_server.responses.create(
        model="tiny",
        input="hi",
        max_output_tokens=40,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "ok", "schema": schema, "strict": True}},
        extra_body={"max_reasoning_tokens": 8},
    )
    assert response.output[0].type == "reasoning" and response.output[0].content[0].text
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= 8 + 4  # + the close
    assert isinstance(json.loads(response.output_text)["ok"], bool)
