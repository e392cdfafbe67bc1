"""Exact to the byte, live: the default model behind the openai SDK (issue 16's reproducers)."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import openai
import pytest

from tests.fixtures.server import running_server

MODEL = "SmolLM2-135M-Instruct"
COUNT = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live():
    with running_server("--autotune", "off") as (base_url, _):
        yield base_url, openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)


def joined(entries) -> bytes:
    return b"".join(bytes(e.bytes) for e in entries)


def test_emoji_logprobs_carry_the_raw_bytes(live) -> None:
    _, client = live
    messages = [{"role": "user", "content": "Write the emoji 🌱 three times."}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, logprobs=True
    )
    content, entries = reply.choices[0].message.content, reply.choices[0].logprobs.content
    assert "🌱" in content and joined(entries) == content.encode()
    assert all("\ufffd" not in e.token for e in entries)
    assert any(e.token.startswith("bytes:\\x") for e in entries)
    legacy = client.completions.create(
        model=MODEL, prompt="My favourite emoji is", max_tokens=8, temperature=0, logprobs=5
    )
    choice = legacy.choices[0]
    assert [len(top) for top in choice.logprobs.top_logprobs] == [5] * 8  # no collisions
    assert max(choice.logprobs.text_offset) <= len(choice.text)


def test_logprobs_end_where_a_stop_string_cuts_the_text(live) -> None:
    _, client = live
    reply = client.chat.completions.create(
        model=MODEL, messages=COUNT, max_tokens=40, temperature=0, logprobs=True, stop=" 8"
    )
    content = reply.choices[0].message.content
    assert content.endswith("7,") and joined(reply.choices[0].logprobs.content) == content.encode()
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=COUNT,
            max_tokens=40,
            temperature=0,
            logprobs=True,
            stop=" 8",
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert text == content and joined(streamed) == content.encode()
    legacy = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=20, temperature=0, logprobs=1, stop=" 8"
    )
    choice = legacy.choices[0]
    assert "".join(choice.logprobs.tokens) == choice.text


def test_the_stop_token_is_not_listed_but_special_tokens_carry_their_text(live) -> None:
    _, client = live
    reply = client.chat.completions.create(
        model=MODEL, messages=FRANCE, max_tokens=40, temperature=0, logprobs=True
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert joined(choice.logprobs.content) == choice.message.content.encode()
    assert len(choice.logprobs.content) == reply.usage.completion_tokens - 1  # the <|im_end|>
    past_the_end = client.chat.completions.create(
        model=MODEL,
        messages=FRANCE,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        extra_body={"ignore_eos": True},
    )
    tokens = [e.token for e in past_the_end.choices[0].logprobs.content]
    assert "<|im_end|>" in tokens and "" not in tokens
    end = tokens.index("<|im_end|>")
    assert past_the_end.choices[0].logprobs.content[end].bytes == list(b"<|im_end|>")


def test_a_client_gone_before_the_answer_is_a_quiet_499(live) -> None:
    base_url, _ = live
    long = {"model": MODEL, "messages": COUNT, "max_tokens": 200, "ignore_eos": True}
    for stream in (False, True):
        subprocess.run(
            [
                "curl",
                "-s",
                "--max-time",
                "1",
                f"{base_url}/chat/completions",
                "-H",
                "content-type: application/json",
                "-d",
                json.dumps({**long, "stream": stream}),
            ],
            capture_output=True,
            timeout=30,
        )
    counted = 'hearth_http_requests_total{route="/v1/chat/completions",status="499"} 2.0'
    for _ in range(50):  # the server notices a streamed client's departure a moment later
        page = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
        if counted in page:
            break
        time.sleep(0.1)
    assert counted in page
    assert 'status="500"' not in page


# -- issue 16, items 7 and 9: tool calls and JSON at small budgets ------------------------------

GET_TIME = [{"type": "function", "function": {"name": "get_time"}}]  # no parameters: takes none
TIME = [{"role": "user", "content": "What time is it? Answer in nested JSON."}]


def test_a_function_without_parameters_is_called_with_the_empty_object(live) -> None:
    _, client = live
    named = {"type": "function", "function": {"name": "get_time"}}
    for seed in (1, 2):
        reply = client.chat.completions.create(
            model=MODEL,
            messages=TIME,
            tools=GET_TIME,
            tool_choice=named,
            max_tokens=30,
            temperature=1.5,
            seed=seed,
        )
        [call] = reply.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_time", "{}")
        assert reply.choices[0].finish_reason == "tool_calls"
        json_mode = client.chat.completions.create(
            model=MODEL,
            messages=TIME,
            response_format={"type": "json_object"},
            max_tokens=20,
            temperature=1.5,
            seed=seed,
        )
        assert isinstance(json.loads(json_mode.choices[0].message.content), dict)


def test_a_forced_call_cut_by_the_budget_leaks_no_markup(live) -> None:
    base_url, client = live
    body = dict(model=MODEL, messages=TIME, tools=GET_TIME, max_tokens=3, temperature=0)
    reply = client.chat.completions.create(tool_choice="required", **body)
    choice = reply.choices[0]
    assert (choice.finish_reason, choice.message.content, choice.message.tool_calls) == (
        "length",
        None,
        None,
    )
    chunks = list(client.chat.completions.create(tool_choice="required", stream=True, **body))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == ""
    assert not any(d.tool_calls for d in deltas) and chunks[-1].choices[0].finish_reason == "length"
    flat = [{"type": "function", "name": "get_time"}]
    response = httpx.post(
        f"{base_url}/responses",
        json={
            "model": MODEL,
            "input": "What time is it?",
            "tools": flat,
            "tool_choice": "required",
            "max_output_tokens": 3,
            "temperature": 0,
        },
        timeout=60,
    ).json()
    assert response["status"] == "incomplete" and "tool_call" not in json.dumps(response["output"])
