"""/tokenize and /detokenize live, on the default model's own tokenizer and chat template."""

from __future__ import annotations

import httpx
import pytest

from tests.fixtures.server import running_server

MODEL = "SmolLM2-135M-Instruct"
TEXT = "Hello, wörld! 🦊 <|im_start|> and 12345"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France? 🇫🇷"},
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live():
    with (
        running_server("--autotune", "off") as (base_url, _),
        httpx.Client(base_url=base_url.removesuffix("/v1"), timeout=60) as client,
    ):
        yield client


def tokenize(client: httpx.Client, **body) -> dict:
    response = client.post("/tokenize", json={"model": MODEL, **body})
    assert response.status_code == 200, response.text
    return response.json()


def detokenize(client: httpx.Client, tokens: list[int]) -> str:
    response = client.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert response.status_code == 200, response.text
    return response.json()["prompt"]


def test_tokenize_then_detokenize_round_trips(live) -> None:
    data = tokenize(live, prompt=TEXT, return_token_strs=True)
    assert data["count"] == len(data["tokens"]) > 5 and data["max_model_len"] == 8192
    assert detokenize(live, data["tokens"]) == TEXT  # the special token's text included
    assert "<|im_start|>" in data["token_strs"]  # a special token in text is that token
    assert "".join(data["token_strs"]).startswith("Hello, w")


def test_messages_count_is_the_chat_completions_prompt_tokens(live) -> None:
    data = tokenize(live, messages=MESSAGES)
    chat = live.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1, "temperature": 0},
    )
    assert chat.status_code == 200, chat.text
    assert data["count"] == chat.json()["usage"]["prompt_tokens"]
    rendered = detokenize(live, data["tokens"])
    assert rendered.startswith("<|im_start|>system\nYou are terse.<|im_end|>")
    assert rendered.endswith("<|im_start|>assistant\n")  # add_generation_prompt


def test_add_special_tokens_adds_only_what_the_tokenizer_adds(live) -> None:
    # SmolLM2's tokenizer adds no BOS/EOS (its template writes <|im_start|> itself): the flag
    # changes nothing, on a prompt (default true) or on messages (default false).
    assert tokenize(live, prompt="", add_special_tokens=True)["tokens"] == []
    plain = tokenize(live, prompt=TEXT, add_special_tokens=False)["tokens"]
    assert tokenize(live, prompt=TEXT)["tokens"] == plain
    chat = tokenize(live, messages=MESSAGES)["tokens"]
    assert tokenize(live, messages=MESSAGES, add_special_tokens=True)["tokens"] == chat


def test_ids_outside_the_vocabulary_are_a_400_naming_tokens(live) -> None:
    for tokens in ([1, 49152], [2**40], [-1]):
        response = live.post("/detokenize", json={"model": MODEL, "tokens": tokens})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "tokens"
