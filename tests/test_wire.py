"""Exact-to-the-byte wire details over a fake engine: nulls, params, message shapes (no torch)."""

from __future__ import annotations

from tests.test_server import assert_envelope, chat, completion, make_client


def test_null_means_unset_on_every_route() -> None:
    client, engine = make_client()
    nulls = dict.fromkeys(
        (
            "n",
            "stream",
            "logprobs",
            "top_logprobs",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "stream_options",
            "tools",
            "tool_choice",
            "response_format",
            "max_tokens",
            "user",
            "min_tokens",
            "ignore_eos",
            "logit_bias",
            "presence_penalty",
            "frequency_penalty",
        ),
    )
    reply = chat(client, **nulls)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "hello"
    assert reply.json()["choices"][0]["logprobs"] is None
    assert engine.requests[-1].sampling.n == 1
    message = {"role": "user", "content": "hi", "name": None, "tool_calls": None}
    assert chat(client, messages=[message]).status_code == 200
    legacy = completion(
        client,
        prompt="q: ok",
        echo=None,
        n=None,
        stream=None,
        max_tokens=None,
        logprobs=None,
        suffix=None,
        stream_options=None,
    )
    assert legacy.status_code == 200, legacy.text
    assert legacy.json()["choices"][0]["text"] == "ok"
    assert engine.requests[-1].sampling.max_tokens == 16  # completions' default, as if absent
    response = client.post(
        "/v1/responses",
        json={
            "model": "fake-model",
            "input": "hi",
            "stream": None,
            "store": None,
            "text": None,
            "tools": None,
            "tool_choice": None,
            "temperature": None,
            "instructions": None,
        },
    )
    assert response.status_code == 200, response.text
    formatted = {"model": "fake-model", "input": "hi", "text": {"format": None}}
    assert client.post("/v1/responses", json=formatted).status_code == 200


def test_null_on_a_required_field_is_still_refused() -> None:
    client, _ = make_client()
    assert_envelope(chat(client, messages=None), 400, "messages")
    assert_envelope(chat(client, messages=[{"role": None, "content": "x"}]), 400)
