"""Live, on the default model: issue 16's echo scoring (lm-evaluation-harness loglikelihood)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.fixtures.server import running_server

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is Paris"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live():
    with running_server("--autotune", "off") as (base_url, _):
        yield base_url


def post(base_url: str, path: str, **body) -> dict:
    response = httpx.post(f"{base_url}{path}", json={"model": MODEL, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def check_logprobs(choice: dict) -> dict:
    lp, text = choice["logprobs"], choice["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert "".join(lp["tokens"]) == text
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] < len(text)
    assert len(set(offsets)) == len(offsets)
    return lp


def test_echo_scores_the_prompt_then_the_generated_token(live) -> None:
    data = post(
        live, "/completions", prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    [choice] = data["choices"]
    n_prompt = data["usage"]["prompt_tokens"]
    assert choice["text"].startswith(PROMPT)
    lp = check_logprobs(choice)
    assert len(lp["tokens"]) == n_prompt + 1 == len(lp["token_logprobs"])
    assert all(len(top) == 1 for top in lp["top_logprobs"][1:])
    assert data["usage"]["completion_tokens"] == 1
    scored = post(live, "/completions", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    [only] = scored["choices"]
    assert only["text"] == PROMPT and only["finish_reason"] == "length"
    assert scored["usage"]["completion_tokens"] == 0
    again = check_logprobs(only)
    assert again["tokens"] == lp["tokens"][:n_prompt]
    assert again["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:n_prompt], abs=1e-4)


def test_vllm_prompt_logprobs_agree_with_the_echo(live) -> None:
    body = {"prompt": PROMPT, "echo": True, "logprobs": 0, "max_tokens": 0, "prompt_logprobs": 2}
    [choice] = post(live, "/completions", **body)["choices"]
    scores = choice["prompt_logprobs"]
    assert scores[0] is None and len(scores) == len(choice["logprobs"]["tokens"])
    lp = choice["logprobs"]
    for position, token, value in zip(
        scores[1:], lp["tokens"][1:], lp["token_logprobs"][1:], strict=True
    ):
        own = [e for e in position.values() if e["decoded_token"] == token]
        assert own and own[0]["logprob"] == pytest.approx(value, abs=1e-6)
        assert {e["rank"] for e in position.values()} >= {1}
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = post(live, "/chat/completions", messages=messages, max_tokens=1, prompt_logprobs=1)
    assert chat["prompt_logprobs"][0] is None
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_every_generated_token_is_listed_after_the_echo(live) -> None:
    """lm-evaluation-harness drops the last entry as the one generated token: a stop token that
    ended the answer must be listed, or the prompt's last token loses its score."""
    prompt = (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris."
    )
    for stream in (False, True):
        body = dict(prompt=prompt, echo=True, logprobs=1, max_tokens=1, temperature=0)
        if stream:
            response = httpx.post(
                f"{live}/completions",
                json={"model": MODEL, "stream": True, **body},
                timeout=120,
            )
            chunks = [
                json.loads(line[6:])
                for line in response.text.splitlines()
                if line.startswith("data: {")
            ]
            tokens = [
                t
                for c in chunks
                if c["choices"]
                for t in (c["choices"][0]["logprobs"] or {}).get("tokens", [])
            ]
        else:
            data = post(live, "/completions", **body)
            tokens = data["choices"][0]["logprobs"]["tokens"]
            n_prompt = data["usage"]["prompt_tokens"]
        assert len(tokens) == n_prompt + 1
        assert tokens[n_prompt - 1] == "."
