"""Files and Batch APIs over a fake engine, driven with the openai SDK: uploads, validation,
output and error files, cancel, resume after a restart, priorities, metrics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from hearth.engine.types import GenerationOutput, GenerationRequest
from hearth.server.app import create_app
from hearth.server.batches import protocol
from hearth.server.batches.lines import _retry_after
from hearth.server.errors import APIError, engine_dead, engine_error, output_error
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine


class StoppingEngine(FakeEngine):
    """`fail_all` ends the requests running with a retryable error, as an engine does when the
    server shuts down past its drain timeout (server/lifecycle.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping = False
        self.failed = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        async for output in super().generate(request):
            if self.stopping:
                self.failed += 1
                n = output.num_prompt_tokens
                message = "the server is shutting down"
                yield GenerationOutput(
                    request.request_id, 0, [], "", n, 0, "error", error=message, retryable=True
                )
                return
            yield output

    def fail_all(self, message: str) -> None:
        self.stopping = True


def make_client(engine: FakeEngine | None = None, **settings: Any) -> TestClient:
    registry = ModelRegistry()
    registry.add(engine or FakeEngine())
    registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(**settings)))


def sdk(client: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0
    )


def chat_line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def wait_for(api: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = 20):
    deadline = time.monotonic() + timeout
    while True:
        batch = api.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.05)


def run_batch(api: openai.OpenAI, lines: list[Any], endpoint: str = "/v1/chat/completions"):
    upload = api.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = api.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h")
    assert batch.status == "validating" and batch.input_file_id == upload.id
    return batch


def read_lines(api: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in api.files.content(file_id).text.splitlines()]


def test_sdk_batch_runs_every_line_once_with_errors_in_the_error_file() -> None:
    engine = FakeEngine()
    with make_client(engine) as client:
        api = sdk(client)
        lines = [chat_line(f"req-{i}", f"hello {i}", max_tokens=4) for i in range(20)]
        lines.append(chat_line("bad", "x", temperature=9))  # the route's own 400
        batch = run_batch(api, lines)
        done = wait_for(api, batch.id, ("completed", "failed"))
        assert done.status == "completed", done.errors
        assert done.request_counts.total == 21
        assert (done.request_counts.completed, done.request_counts.failed) == (20, 1)
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        out = read_lines(api, done.output_file_id)
        errors = read_lines(api, done.error_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(20))
    first = next(x for x in out if x["custom_id"] == "req-3")
    assert first["response"]["status_code"] == 200 and first["error"] is None
    assert first["response"]["body"]["choices"][0]["message"]["content"] == "hell"
    [bad] = errors
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "temperature"
    assert {r.sampling.priority for r in engine.requests} == {ServerSettings.batch_priority}


def test_a_file_with_bad_lines_fails_validation_naming_each_line() -> None:
    with make_client() as client:
        api = sdk(client)
        lines = [
            chat_line("a", "x"),
            "{not json",
            chat_line("a", "again"),
            {**chat_line("c", "x"), "url": "/v1/embeddings"},
            {"custom_id": "d", "method": "POST", "url": "/v1/chat/completions", "body": 3},
        ]
        batch = run_batch(api, lines)
        failed = wait_for(api, batch.id, ("failed", "completed"))
    assert failed.status == "failed" and failed.failed_at
    found = [(e.line, e.code) for e in failed.errors.data]
    assert found == [
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_endpoint"),
        (5, "invalid_request"),
    ]


def test_cancel_stops_the_remaining_lines_and_aborts_the_running_ones() -> None:
    engine = FakeEngine()
    engine.delay = 0.05  # 20 tokens a line: a second each
    with make_client(engine, batch_max_in_flight=2) as client:
        api = sdk(client)
        lines = [chat_line(f"r{i}", "y" * 20, max_tokens=20) for i in range(10)]
        batch = run_batch(api, lines)
        wait_for(api, batch.id, ("in_progress",))
        deadline = time.monotonic() + 10
        while len(engine.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        cancelling = api.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled")
        done = wait_for(api, batch.id, ("cancelled",))
        with pytest.raises(openai.BadRequestError):
            api.batches.cancel(batch.id)
        errors = read_lines(api, done.error_file_id)
        out = read_lines(api, done.output_file_id)
    assert engine.aborted  # the lines running were aborted (their KV freed)
    ids = [x["custom_id"] for x in out + errors]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert done.request_counts.failed == len(errors) >= 8


def test_a_restarted_server_resumes_the_batch_without_running_a_line_twice(
    tmp_path: Path,
) -> None:
    slow = FakeEngine()
    slow.delay = 0.02
    lines = [chat_line(f"r{i}", "z" * 10, max_tokens=10) for i in range(12)]
    with make_client(slow, files_dir=str(tmp_path), batch_max_in_flight=2) as client:
        api = sdk(client)
        batch = run_batch(api, lines)
        deadline = time.monotonic() + 10
        while api.batches.retrieve(batch.id).request_counts.completed < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # the app stopped mid-batch (its lines cancelled, not recorded); a new one on the same folder
    stopped = len(slow.requests)
    engine = FakeEngine()
    with make_client(engine, files_dir=str(tmp_path)) as client:
        api = sdk(client)
        done = wait_for(api, batch.id, ("completed",))
        out = read_lines(api, done.output_file_id)
    assert 3 <= stopped < 12 and 0 < len(engine.requests) <= 12 - 3
    assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(12))


def test_embedding_and_completion_batches(tmp_path: Path) -> None:
    with make_client() as client:
        api = sdk(client)
        lines = [
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "fake-model", "prompt": f"p{i}", "max_tokens": 2},
            }
            for i in range(3)
        ]
        done = wait_for(api, run_batch(api, lines, "/v1/completions").id, ("completed",))
        out = read_lines(api, done.output_file_id)
        assert sorted(x["custom_id"] for x in out) == ["c0", "c1", "c2"]
        assert out[0]["response"]["body"]["object"] == "text_completion"
        # embeddings of a generation model: each line gets the live route's 400
        embed = [
            {**line, "url": "/v1/embeddings", "body": {"model": "fake-model", "input": "x"}}
            for line in lines
        ]
        done = wait_for(api, run_batch(api, embed, "/v1/embeddings").id, ("completed",))
        errors = read_lines(api, done.error_file_id)
        assert [x["response"]["status_code"] for x in errors] == [400] * 3
        assert errors[0]["response"]["body"]["error"]["param"] == "model"


def test_files_api_objects_listing_and_limits() -> None:
    with make_client(max_file_bytes=1000) as client:
        api = sdk(client)
        first = api.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        second = api.files.create(file=("b.jsonl", b"{}\n{}\n"), purpose="batch")
        assert first.object == "file" and first.bytes == 3 and first.filename == "a.jsonl"
        assert api.files.retrieve(second.id).bytes == 6
        assert [f.id for f in api.files.list()] == [second.id, first.id]
        assert [f.id for f in api.files.list(order="asc")] == [first.id, second.id]
        assert api.files.content(first.id).content == b"{}\n"
        assert api.files.delete(first.id).deleted
        with pytest.raises(openai.NotFoundError):
            api.files.retrieve(first.id)
        assert client.delete("/v1/files/..").status_code == 404  # never a path of its own
        assert client.get("/v1/files/../content").status_code == 404
        assert api.files.retrieve(second.id).bytes == 6
        with pytest.raises(openai.BadRequestError) as bad:
            api.files.create(file=("c.jsonl", b"{}\n"), purpose="fine-tune")
        assert bad.value.body["param"] == "purpose"
        big = client.post(
            "/v1/files", files={"file": ("d", b"x" * 5000)}, data={"purpose": "batch"}
        )
        assert big.status_code == 413
        missing = client.post("/v1/files", data={"purpose": "batch"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
        with pytest.raises(openai.NotFoundError):
            api.batches.create(
                input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h"
            )
        with pytest.raises(openai.BadRequestError) as bad:
            api.batches.create(
                input_file_id=second.id, endpoint="/v1/images", completion_window="24h"
            )
        assert bad.value.body["param"] == "endpoint"


def test_live_requests_carry_their_priority_and_metrics_count_batches() -> None:
    engine = FakeEngine()
    with make_client(engine) as client:
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": "hi"}],
                "priority": 3,
            },
        )
        assert reply.status_code == 200 and engine.requests[-1].sampling.priority == 3
        for route, body in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
            ("/v1/completions", {"prompt": "x"}),
            ("/v1/responses", {"input": "x"}),
        ]:  # a client may only yield: a negative priority would preempt everyone else
            refused = client.post(route, json={"model": "fake-model", "priority": -1, **body})
            assert refused.status_code == 400, (route, refused.text)
            assert "priority" in refused.json()["error"]["message"] + str(
                refused.json()["error"].get("param")
            )
        client.post("/v1/completions", json={"model": "fake-model", "prompt": "x"})
        assert engine.requests[-1].sampling.priority == 0
        api = sdk(client)
        wait_for(api, run_batch(api, [chat_line("a", "b")]).id, ("completed",))
        assert [b.id for b in api.batches.list()]
        page = client.get("/metrics").text
    assert 'hearth_batches{status="completed"} 1.0' in page
    assert 'hearth_batch_lines_total{outcome="completed"} 1.0' in page


def test_lines_failed_by_the_shutdown_are_not_answers_and_run_after_restart(
    tmp_path: Path,
) -> None:
    engine = StoppingEngine()
    engine.delay = 0.05  # 20 tokens a line: a second each
    lines = [chat_line(f"r{i}", "w" * 20, max_tokens=20) for i in range(6)]
    with make_client(engine, files_dir=str(tmp_path), batch_max_in_flight=2) as client:
        api = sdk(client)
        batch = run_batch(api, lines)
        deadline = time.monotonic() + 10
        while len(engine.requests) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # the stop signal, then the drain timeout: the engine fails what is running (503)
        client.app.state.registry.state = "draining"
        engine.fail_all("the server is shutting down")
        while engine.failed < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        store = client.app.state.batch_runner.store
        counts = store.get(batch.id)["request_counts"]
        assert counts["failed"] == 0  # a shutdown's 503 is no line's answer
        assert len(store.todo(batch.id)) == 6 - counts["completed"] >= 2
    engine = FakeEngine()
    with make_client(engine, files_dir=str(tmp_path)) as client:
        api = sdk(client)
        done = wait_for(api, batch.id, ("completed",))
        out = read_lines(api, done.output_file_id)
    assert done.error_file_id is None and len(engine.requests) == 6 - counts["completed"]
    assert sorted(x["custom_id"] for x in out) == sorted(f"r{i}" for i in range(6))
    assert {x["response"]["status_code"] for x in out} == {200}


@pytest.mark.parametrize(
    ("error", "state", "retry"),
    [
        (output_error("the server is shutting down", True), "ready", True),
        (engine_dead("fake-model"), "ready", True),
        (engine_error(RuntimeError("bad")), "ready", False),
        (output_error("hearth's bug", False), "ready", False),
        (output_error("hearth's bug", False), "draining", True),
        (APIError(503, "busy", headers={"Retry-After": "2"}), "ready", True),
        (APIError(404, "no such model"), "ready", False),
    ],
)
def test_which_failures_are_retried_instead_of_answered(
    error: APIError, state: str, retry: bool
) -> None:
    app = SimpleNamespace(state=SimpleNamespace(registry=SimpleNamespace(state=state)))
    assert (_retry_after(app, error) is not None) is retry  # type: ignore[arg-type]


def test_a_cancel_while_an_expired_batch_finalizes_is_refused_and_one_finalize_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(protocol.WINDOW_S, "24h", 2)  # expires 1-2 s after its creation
    engine = FakeEngine()
    engine.delay = 0.05
    with make_client(engine, batch_max_in_flight=1) as client:
        api = sdk(client)
        runner = client.app.state.batch_runner
        finalize, calls, gate = runner._finalize, [], threading.Event()

        def held(batch: dict[str, Any], status: str) -> None:
            calls.append(status)
            gate.wait(10)
            finalize(batch, status)

        runner._finalize = held
        lines = [chat_line(f"r{i}", "v" * 20, max_tokens=20) for i in range(8)]
        batch = run_batch(api, lines)
        finalizing = wait_for(api, batch.id, ("finalizing",))
        assert finalizing.expired_at  # it ends expired
        with pytest.raises(openai.BadRequestError):
            api.batches.cancel(batch.id)
        gate.set()
        done = wait_for(api, batch.id, ("expired", "cancelled", "completed"))
        errors = read_lines(api, done.error_file_id)
    assert done.status == "expired" and calls == ["expired"]
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}
    assert done.request_counts.completed + len(errors) == 8 and len(errors) >= 4
