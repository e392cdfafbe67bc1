"""Live (issue 17): thinking-template models served by hearth, driven with the official openai SDK.

Two tiny random models share one checkpoint: `r1` has an R1-distill-style template (the
generation prompt opens `<think>`), `qwen3` a Qwen3-style one (`enable_thinking`). A random model
never closes a block by itself, so the reasoning budget (`max_reasoning_tokens`) closes it: the
engine forces `</think>`, then the answer follows, under `response_format` when one is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.fixtures.server import TEMPLATES, running_server

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "rank": {"type": "integer"}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
ASK = [{"role": "user", "content": "Which city? Answer in JSON."}]
BUDGET = 8


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    tmp = tmp_path_factory.mktemp("reasoning")
    models = [
        {
            "id": name,
            "source": str(tiny_llama_dir),
            "device": "cpu",
            "chat_template": str(TEMPLATES / f"{template}.jinja"),
            "engine": {"kv_cache_memory": "64MiB"},
        }
        for name, template in (("r1", "r1_distill_style"), ("qwen3", "qwen3_style"))
    ]
    config = tmp / "models.yaml"
    config.write_text(json.dumps({"models": models}))
    with running_server("--config", str(config), "--autotune", "off") as (base_url, _):
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        client.root = base_url.removesuffix("/v1")  # /tokenize and /detokenize live there
        yield client


def test_thinking_then_a_schema_valid_answer_streamed_and_not(client: openai.OpenAI) -> None:
    body = dict(
        model="r1",
        messages=ASK,
        max_tokens=80,
        temperature=0,
        response_format=FORMAT,
        extra_body={"max_reasoning_tokens": BUDGET},
    )
    reply = client.chat.completions.create(**body)
    message = reply.choices[0].message
    thinking = message.model_extra["reasoning_content"]
    assert thinking and message.model_extra["reasoning"] == thinking
    assert "</think>" not in thinking and "</think>" not in message.content
    jsonschema.validate(json.loads(message.content), SCHEMA)  # the answer obeys the schema
    assert reply.choices[0].finish_reason == "stop"
    reasoning_tokens = reply.usage.completion_tokens_details.reasoning_tokens
    assert BUDGET <= reasoning_tokens <= BUDGET + 4  # the budget, and the closing tag's tokens
    chunks = list(client.chat.completions.create(**body, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_thinking = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    streamed_content = "".join(d.content or "" for d in deltas)
    assert streamed_thinking == thinking and streamed_content == message.content
    kinds = [
        "thinking" if d.model_extra.get("reasoning_content") else "content"
        for d in deltas
        if d.content or d.model_extra.get("reasoning_content")
    ]
    assert kinds == sorted(kinds, reverse=True) and kinds[0] == "thinking"  # thinking first


def test_an_unclosed_block_is_all_reasoning_when_the_length_runs_out(
    client: openai.OpenAI,
) -> None:
    reply = client.chat.completions.create(model="r1", messages=ASK, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.model_extra["reasoning_content"]
    assert reply.usage.completion_tokens_details.reasoning_tokens == 12


def test_enable_thinking_false_yields_no_reasoning(client: openai.OpenAI) -> None:
    for extra in ({"chat_template_kwargs": {"enable_thinking": False}}, {}):
        reply = client.chat.completions.create(
            model="qwen3",
            messages=ASK,
            max_tokens=20,
            temperature=0,
            response_format=FORMAT,
            extra_body={"max_reasoning_tokens": BUDGET, **extra},
        )
        message = reply.choices[0].message
        if extra:  # the template rendered a closed, empty block: no thinking, only the answer
            assert message.model_extra["reasoning_content"] is None
            assert reply.usage.completion_tokens_details.reasoning_tokens == 0
        assert message.content.lstrip().startswith("{")  # the answer's grammar from the start
    off = {"enable_thinking": False}
    body = {"model": "qwen3", "messages": ASK, "chat_template_kwargs": off}
    tokens = httpx.post(f"{client.root}/tokenize", json=body).json()["tokens"]
    text = httpx.post(f"{client.root}/detokenize", json={"model": "qwen3", "tokens": tokens})
    assert text.json()["prompt"].endswith("<think>\n\n</think>\n\n")


def test_thinking_sent_back_is_rendered_by_templates_that_know_it(client: openai.OpenAI) -> None:
    for field in ("reasoning_content", "reasoning"):
        messages = [
            {"role": "user", "content": "Which city?"},
            {"role": "assistant", "content": "Paris.", field: "They asked for a city."},
            {"role": "user", "content": "Why?"},
        ]
        rendered = {}
        for model in ("qwen3", "r1"):
            body = {"model": model, "messages": messages}
            tokens = httpx.post(f"{client.root}/tokenize", json=body).json()["tokens"]
            text = httpx.post(f"{client.root}/detokenize", json={"model": model, "tokens": tokens})
            rendered[model] = text.json()["prompt"]
        assert "<think>\nThey asked for a city.\n</think>\n\nParis." in rendered["qwen3"]
        assert "They asked for a city." not in rendered["r1"]  # dropped cleanly
        assert "<|im_start|>assistant\nParis.<|im_end|>" in rendered["r1"]
        reply = client.chat.completions.create(
            model="qwen3", messages=messages, max_tokens=4, temperature=0
        )
        assert reply.choices[0].finish_reason == "length"
