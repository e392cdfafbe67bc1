"""The Batch API on a live `hearth serve`, through the official openai SDK: a chat batch of 100
lines and an embeddings batch of 50 (a tiny generation model and a tiny BERT embedder in one
models.yaml), each custom_id answered once; then a server SIGKILLed mid-batch and restarted on
the same files folder finishes the batch with no custom_id missing or repeated; a cancelled
batch ends with every line accounted for and the engine idle, its KV blocks free."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.embedding import build_tiny_bert, sample_texts
from tests.fixtures.server import running_server

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")


def models_yaml(root: Path, tiny: Path, bert: Path | None = None) -> Path:
    models: list[dict[str, Any]] = [
        {
            "id": "tiny",
            "source": str(tiny),
            "device": "cpu",
            "engine": {"kv_cache_memory": "64MiB", "autotune": "off"},
        }
    ]
    if bert is not None:
        models.append({"id": "bert", "source": str(bert), "device": "cpu", "task": "embed"})
    path = root / "models.yaml"
    path.write_text(json.dumps({"models": models}))
    return path


def client_of(base: str) -> Any:
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)


def chat_lines(count: int, max_tokens: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": f"chat-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"Count to {i}."}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        }
        for i in range(count)
    ]


def submit(client: Any, lines: list[dict[str, Any]], endpoint: str) -> Any:
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.files.create(file=("input.jsonl", data), purpose="batch")
    assert upload.purpose == "batch" and upload.bytes == len(data)
    return client.batches.create(
        input_file_id=upload.id,
        endpoint=endpoint,
        completion_window="24h",
        metadata={"test": "live"},
    )


def poll(client: Any, batch_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, f"still {batch.status}: {batch.request_counts}"
        time.sleep(0.25)


def answers(client: Any, batch: Any) -> list[dict[str, Any]]:
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            lines += [json.loads(x) for x in client.files.content(file_id).text.splitlines()]
    return lines


def test_sdk_chat_and_embedding_batches_answer_every_line_once(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    bert = build_tiny_bert(tmp_path / "bert")
    config = models_yaml(tmp_path, tiny_llama_dir, bert)
    files = tmp_path / "files"
    with running_server("--config", str(config), "--files-dir", str(files)) as (base, _):
        client = client_of(base)
        chat = submit(client, chat_lines(100, 8), "/v1/chat/completions")
        texts = sample_texts(50)
        embed_lines = [
            {
                "custom_id": f"embed-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "bert", "input": text},
            }
            for i, text in enumerate(texts)
        ]
        embed = submit(client, embed_lines, "/v1/embeddings")
        chat, embed = poll(client, chat.id), poll(client, embed.id)
        metrics = httpx.get(base.removesuffix("/v1") + "/metrics").text
        for batch, count, prefix in ((chat, 100, "chat"), (embed, 50, "embed")):
            assert batch.status == "completed", batch.errors
            assert batch.request_counts.total == batch.request_counts.completed == count
            assert batch.error_file_id is None and batch.metadata == {"test": "live"}
            lines = answers(client, batch)
            assert Counter(x["custom_id"] for x in lines) == {
                f"{prefix}-{i}": 1 for i in range(count)
            }
            assert all(x["response"]["status_code"] == 200 for x in lines)
        chat_bodies = [x["response"]["body"] for x in answers(client, chat)]
        assert all(b["usage"]["completion_tokens"] == 8 for b in chat_bodies)
        vectors = [x["response"]["body"]["data"][0]["embedding"] for x in answers(client, embed)]
        assert all(len(v) == 32 for v in vectors)
        listed = client.batches.list(limit=10)
        assert {b.id for b in listed} >= {chat.id, embed.id}
    assert 'hearth_batches{status="completed"} 2.0' in metrics
    assert 'hearth_batch_lines_total{outcome="completed"} 150.0' in metrics


def test_a_sigkilled_server_resumes_its_batch_with_each_line_once(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    config = models_yaml(tmp_path, tiny_llama_dir)
    args = ("--config", str(config), "--files-dir", str(tmp_path / "files"))
    total = 40
    with running_server(*args, "--batch-max-in-flight", "1") as (base, proc):
        client = client_of(base)
        batch = submit(client, chat_lines(total, 64), "/v1/chat/completions")
        deadline = time.monotonic() + 120
        while (done := client.batches.retrieve(batch.id).request_counts.completed) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no shutdown code runs
        proc.wait()
    assert done < total, "the batch finished before the kill; make it longer"
    with running_server(*args) as (base, _):
        client = client_of(base)
        finished = poll(client, batch.id)
        assert finished.status == "completed", finished.errors
        lines = answers(client, finished)
    assert Counter(x["custom_id"] for x in lines) == {f"chat-{i}": 1 for i in range(total)}
    assert all(x["response"]["status_code"] == 200 for x in lines)
    assert finished.request_counts.completed == total


def test_cancel_ends_the_batch_and_frees_the_engine(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from hearth.server.metrics import read_load_gauges

    config = models_yaml(tmp_path, tiny_llama_dir)
    args = ("--config", str(config), "--files-dir", str(tmp_path / "files"))
    with running_server(*args, "--batch-max-in-flight", "4") as (base, _):
        client = client_of(base)
        batch = submit(client, chat_lines(60, 64), "/v1/chat/completions")
        deadline = time.monotonic() + 120
        while client.batches.retrieve(batch.id).request_counts.completed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.batches.cancel(batch.id).status == "cancelling"
        done = poll(client, batch.id)
        assert done.status == "cancelled" and done.cancelled_at
        lines = answers(client, done)
        assert Counter(x["custom_id"] for x in lines) == {f"chat-{i}": 1 for i in range(60)}
        cancelled = [x for x in lines if x["error"]]
        assert cancelled and {x["error"]["code"] for x in cancelled} == {"batch_cancelled"}
        assert done.request_counts.failed == len(cancelled)
        page = httpx.get(base.removesuffix("/v1") + "/metrics").text
        gauges = read_load_gauges(page, "tiny")
        assert gauges["hearth_requests_running"] == gauges["hearth_requests_waiting"] == 0
        assert gauges["hearth_kv_cache_usage_ratio"] == 0  # the aborted lines' blocks are free
