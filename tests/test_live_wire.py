"""Exact to the byte, live: the default model behind the openai SDK (issue 16's reproducers)."""

from __future__ import annotations

import json
import subprocess
import time

import httpx
import openai
import pytest

from tests.conftest import running_server

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
