"""A model served with n-gram speculation: streamed chat equals the opted-out run (accepted
tokens arrive together, in fewer chunks), and /metrics counts the drafts."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.fixtures.server import running_server, tiny_config

SPEC = {"speculative": {"method": "ngram", "num_speculative_tokens": 4, "max_batch": 4}}


def stream(client: OpenAI, content: str, **extra) -> tuple[str, int, list]:
    chunks = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        max_tokens=48,
        temperature=0,
        stream=True,
        logprobs=True,
        extra_body={"ignore_eos": True, **extra},
    )
    text, count, logprobs = "", 0, []
    for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
            count += 1
            logprobs += chunk.choices[0].logprobs.content or []
    return text, count, logprobs


@pytest.mark.slow
def test_streamed_chat_with_speculation_equals_without(tiny_llama_dir: Path, tmp_path: Path):
    config = tiny_config(tmp_path / "models.yaml", tiny_llama_dir, SPEC, autotune="off")
    with running_server("--config", str(config)) as (base_url, _):
        client = OpenAI(base_url=base_url, api_key="x")
        content = "one two three one two three one two three"
        plain, plain_chunks, plain_lp = stream(client, content, speculative=False)
        spec, spec_chunks, spec_lp = stream(client, content)
        assert spec == plain and plain
        assert [t.token for t in spec_lp] == [t.token for t in plain_lp]
        assert spec_chunks < plain_chunks  # several accepted tokens per chunk
        page = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
        assert 'hearth_spec_decode_accepted_tokens_total{model="tiny"}' in page
