"""Live (issue 20): the Responses store across a restart of `hearth serve`, and background responses
on a real engine: polled to `completed`, and a cancelled one that ends `cancelled` and frees its
KV blocks. Driven with the official openai SDK against the tiny random model."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.fixtures.server import build_tiny_checkpoint, running_server, tiny_config

pytestmark = pytest.mark.slow

OK = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    """The tiny random model with a long context, so a background answer runs long enough to
    be cancelled mid-way."""
    tmp = tmp_path_factory.mktemp("store")
    model = build_tiny_checkpoint(tmp / "tiny", smollm_tokenizer_dir)
    settings = json.loads((model / "config.json").read_text())
    settings["max_position_embeddings"] = 16384
    (model / "config.json").write_text(json.dumps(settings))
    return tiny_config(tmp / "models.yaml", model)


def serve(config: Path, db: Path):
    args = ("--config", str(config), "--autotune", "off", "--responses-db", str(db))
    return running_server(*args)


def gauge(base_url: str, name: str) -> float:
    """One of the model's gauges in /metrics."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    found = re.search(rf'^{name}\{{model="tiny"\}} (\S+)$', text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_a_stored_response_survives_a_restart_and_chains(config: Path, tmp_path: Path) -> None:
    db = tmp_path / "responses.sqlite3"
    ask = dict(model="tiny", max_output_tokens=6, temperature=0)
    with serve(config, db) as (base_url, _):
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        first = client.responses.create(input="Remember the word kiwi, please.", **ask)
        assert first.status in ("completed", "incomplete")
    with serve(config, db) as (base_url, _):  # a new process on the same database
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        again = client.responses.retrieve(first.id)
        assert again.id == first.id and again.output_text == first.output_text
        [item] = client.responses.input_items.list(first.id).data
        assert item.type == "message"
        chained = client.responses.create(input="Which word?", previous_response_id=first.id, **ask)
        alone = client.responses.create(input="Which word?", **ask)
        # the chain's context (the first turn and its answer) is in the prompt
        assert chained.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
        assert chained.previous_response_id == first.id


def test_background_responses_complete_or_cancel_and_free_their_kv(
    config: Path, tmp_path: Path
) -> None:
    with serve(config, tmp_path / "responses.sqlite3") as (base_url, _):
        client = openai.OpenAI(base_url=base_url, api_key="unused")
        short = client.responses.create(  # a grammar ends it: `completed`, not cut by length
            model="tiny",
            input="hi",
            background=True,
            max_output_tokens=40,
            temperature=0,
            text={"format": {"type": "json_schema", "name": "ok", "schema": OK}},
        )
        assert short.status in ("queued", "in_progress")
        done = wait_for(
            lambda: (r := client.responses.retrieve(short.id)).status == "completed" and r,
            what="the short background response",
        )
        assert json.loads(done.output_text)["ok"] in (True, False)
        long = client.responses.create(
            model="tiny", input="go on", background=True, max_output_tokens=12000, temperature=0
        )
        wait_for(lambda: gauge(base_url, "hearth_kv_cache_usage_ratio") > 0, what="KV in use")
        cancelled = client.responses.cancel(long.id)
        assert cancelled.status == "cancelled"
        assert client.responses.retrieve(long.id).status == "cancelled"
        wait_for(
            lambda: (
                gauge(base_url, "hearth_requests_running") == 0
                and gauge(base_url, "hearth_kv_cache_usage_ratio") == 0
            ),
            timeout=30,
            what="the cancelled request's KV blocks to be freed",
        )
