"""Prompt scoring on the wire over the fake engine: completions echo logprobs, max_tokens 0,
vLLM's prompt_logprobs on completions and chat (no torch)."""

from __future__ import annotations

import json

import pytest

from tests.unit.test_server import assert_envelope, chat, completion, make_client, sse_events

PROMPT = "e: yes"  # the fake engine's tokens are bytes; it answers "yes"
# The fake gives no logprobs for generated tokens: the lists below hold the prompt's entries only
# (tests/live/test_prompt_logprobs.py checks prompt and generated tokens together).


def test_echo_logprobs_cover_the_prompt_then_the_completion() -> None:
    client, engine = make_client()
    data = completion(client, prompt=PROMPT, echo=True, logprobs=1, max_tokens=2).json()
    assert engine.requests[-1].sampling.prompt_logprobs == 1
    [choice] = data["choices"]
    assert choice["text"] == PROMPT + "ye"
    lp = choice["logprobs"]
    assert lp["tokens"] == list(PROMPT)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1 : len(PROMPT)] == [-i / 10 for i in range(1, len(PROMPT))]
    assert lp["top_logprobs"][1] == {"!": -1.0}  # the fake's one alternative
    assert lp["text_offset"] == list(range(len(PROMPT)))
    assert "prompt_logprobs" not in choice  # only when asked for by name
    assert data["usage"]["completion_tokens"] == 2


def test_echo_without_logprobs_scores_nothing() -> None:
    client, engine = make_client()
    data = completion(client, prompt=PROMPT, echo=True, max_tokens=2).json()
    assert engine.requests[-1].sampling.prompt_logprobs is None
    assert data["choices"][0]["logprobs"] is None


def test_max_tokens_zero_with_echo_scores_the_prompt_only() -> None:
    client, _ = make_client()
    data = completion(client, prompt=PROMPT, echo=True, logprobs=0, max_tokens=0).json()
    [choice] = data["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == list(PROMPT)
    assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(PROMPT) - 1)
    assert data["usage"]["completion_tokens"] == 0
    assert data["usage"]["prompt_tokens"] == len(PROMPT)


def test_max_tokens_zero_without_echo_is_400_naming_it() -> None:
    client, _ = make_client()
    error = assert_envelope(completion(client, prompt=PROMPT, max_tokens=0), 400, "max_tokens")
    assert "echo" in error["message"]


@pytest.mark.parametrize("value", [-1, 21])
def test_out_of_range_prompt_logprobs_is_400_naming_it(value: int) -> None:
    client, _ = make_client()
    bad = completion(client, prompt=PROMPT, prompt_logprobs=value)
    assert_envelope(bad, 400, "prompt_logprobs")
    assert_envelope(chat(client, prompt_logprobs=value), 400, "prompt_logprobs")


def test_vllm_prompt_logprobs_on_a_completion_choice() -> None:
    client, engine = make_client()
    data = completion(client, prompt=PROMPT, prompt_logprobs=2, max_tokens=1).json()
    assert engine.requests[-1].sampling.prompt_logprobs == 2
    scores = data["choices"][0]["prompt_logprobs"]
    assert len(scores) == len(PROMPT) and scores[0] is None
    assert scores[1] == {
        str(ord(":")): {"logprob": -0.1, "rank": 1, "decoded_token": ":"},
        str(0x21): {"logprob": -1.0, "rank": 1, "decoded_token": "!"},
        str(0x22): {"logprob": -2.0, "rank": 2, "decoded_token": '"'},
    }
    assert data["choices"][0]["logprobs"] is None


def test_echo_and_prompt_logprobs_each_keep_their_own_k() -> None:
    client, engine = make_client()
    body = {"prompt": PROMPT, "echo": True, "logprobs": 1, "prompt_logprobs": 3, "max_tokens": 1}
    choice = completion(client, **body).json()["choices"][0]
    assert engine.requests[-1].sampling.prompt_logprobs == 3
    assert len(choice["logprobs"]["top_logprobs"][2]) == 1
    assert len(choice["prompt_logprobs"][2]) == 4  # the token itself and its 3 alternatives


def test_vllm_prompt_logprobs_at_the_top_of_a_chat_response() -> None:
    client, engine = make_client()
    data = chat(client, prompt_logprobs=0, max_tokens=3).json()
    prompt = engine.requests[-1].prompt_token_ids
    scores = data["prompt_logprobs"]
    assert len(scores) == len(prompt) and scores[0] is None
    assert all(list(s) == [str(t)] for s, t in zip(scores[1:], prompt[1:], strict=True))
    assert "prompt_logprobs" not in chat(client, max_tokens=3).json()


def test_streamed_echo_carries_the_prompt_logprobs_in_its_first_engine_chunk() -> None:
    client, _ = make_client()
    body = {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 2, "stream": True}
    chunks = [json.loads(p) for p in sse_events(completion(client, **body).text)[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    tokens, offsets, values = [], [], []
    for c in chunks:
        lp = c["choices"][0]["logprobs"]
        if lp:
            tokens += lp["tokens"]
            offsets += lp["text_offset"]
            values += lp["token_logprobs"]
    assert text == PROMPT + "ye" and "".join(tokens) == PROMPT
    assert offsets == list(range(len(PROMPT))) and values[0] is None
