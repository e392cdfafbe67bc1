"""The persistent Responses store (SQLite) and the Responses lifecycle: input_items, cancel,
background responses (polled, streamed, resumed) and item_reference (fake engine, SDK)."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response

from hearth import launch
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.responses.sqlite_store import SCHEMA_VERSION, SqliteResponseStore
from hearth.server.responses.store import StoreError, open_store
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import assert_envelope, create, events_of, make_client, sdk


def db_client(path: Path, engine: FakeEngine | None = None, **settings: Any) -> TestClient:
    client, _ = make_client(engine, responses_db=str(path), **settings)
    return client


def wait_for(client: TestClient, response_id: str, *statuses: str) -> dict:
    deadline = time.monotonic() + 10
    while True:
        response = client.get(f"/v1/responses/{response_id}").json()
        if response["status"] in statuses:
            Response.model_validate(response)
            return response
        assert time.monotonic() < deadline, response
        time.sleep(0.01)


# -- the SQLite store --------------------------------------------------------------------------


def test_sqlite_store_puts_gets_pops_and_evicts(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqliteResponseStore(str(tmp_path / "r.db"), 2, 10, clock=lambda: now[0])
    for name in ("a", "b", "c"):
        store.put({"id": name, "status": "completed"}, [], [{"id": f"in_{name}"}])
    assert store.get("a") is None and len(store) == 2  # the oldest went first
    assert store.find_item("in_a") is None and store.find_item("in_b") == {"id": "in_b"}
    now[0] += 5
    store.put({"id": "d", "status": "completed"}, [{"role": "user", "content": "x"}])  # evicts b
    store.put({"id": "c", "status": "completed", "n": 2}, [])  # an update keeps c's place
    assert store.get("c").response["n"] == 2 and store.get("c").input_items == [{"id": "in_c"}]
    now[0] += 5  # c has expired, d has not
    assert (store.get("b"), store.get("c")) == (None, None)
    assert store.get("d").messages == [{"role": "user", "content": "x"}]
    assert store.pop("d") is not None and len(store) == 0 and store.pop("d") is None
    store.close()


def test_sqlite_store_survives_reopening_with_wal_and_its_schema(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "r.db")  # its folder is created
    store = SqliteResponseStore(path, 10, 60)
    store.put({"id": "a", "status": "completed"}, [{"role": "user", "content": "hi"}], [])
    store.put({"id": "q", "status": "in_progress"}, [], [])  # its server stops
    store.close()
    again = SqliteResponseStore(path, 10, 60)
    assert again.get("a").messages == [{"role": "user", "content": "hi"}]
    orphan = again.get("q").response
    assert orphan["status"] == "failed" and orphan["error"]["message"]
    again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        db.execute("PRAGMA user_version=99")
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        SqliteResponseStore(path, 10, 60)


def test_corrupt_locked_or_unknown_stores_are_clear_errors(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"corrupt\.db.*not a database"):
        SqliteResponseStore(str(corrupt), 10, 60)
    assert corrupt.read_bytes().startswith(b"this is not")  # left alone, not replaced
    locked = str(tmp_path / "locked.db")
    SqliteResponseStore(locked, 10, 60).close()
    holder = sqlite3.connect(locked, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked"):
            SqliteResponseStore(locked, 10, 60, timeout_s=0.1)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match="cannot open"):
        SqliteResponseStore(str(tmp_path / "file" / "r.db"), 10, 60)
    with pytest.raises(StoreError, match="no 'postgresql' backend"):
        open_store(ServerSettings(responses_db="postgresql://db/hearth"))


def test_serve_refuses_a_corrupt_store_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"garbage" * 1000)
    selection = launch.Selection([], {}, tmp_path)
    settings = ServerSettings(responses_db=str(corrupt))
    assert launch.serve(selection, settings, "127.0.0.1", 0, "info") == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("hearth: error: --responses-db") and "\n" not in error


def test_default_settings_keep_responses_in_memory() -> None:
    assert ServerSettings().responses_db == ":memory:"
    client, _ = make_client()
    assert type(client.app.state.response_store).__name__ == "MemoryResponseStore"


def test_a_new_app_on_the_same_file_serves_stored_responses(tmp_path: Path) -> None:
    path = tmp_path / "responses.db"
    with db_client(path) as client:
        first = create(client, input="one").json()
    engine = FakeEngine()
    with db_client(path, engine) as client:
        assert client.get(f"/v1/responses/{first['id']}").json() == first
        create(client, input="two", previous_response_id=first["id"])
        assert engine.decode(engine.requests[-1].prompt_token_ids) == (
            "user: one\nassistant: one\nuser: two\n"
        )
        items = client.get(f"/v1/responses/{first['id']}/input_items").json()
        assert [i["content"][0]["text"] for i in items["data"]] == ["one"]


# -- input_items -------------------------------------------------------------------------------


def test_input_items_paginate_like_openai() -> None:
    client, _ = make_client()
    inputs = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    created = create(client, input=inputs).json()
    url = f"/v1/responses/{created['id']}/input_items"
    everything = client.get(url).json()
    assert everything["object"] == "list" and everything["has_more"] is False
    texts = [item["content"][0]["text"] for item in everything["data"]]
    assert texts == ["m4", "m3", "m2", "m1", "m0"]  # desc by default
    item = everything["data"][0]
    assert item["type"] == "message" and item["role"] == "user" and item["id"].startswith("msg_")
    first = client.get(url, params={"order": "asc", "limit": 2}).json()
    assert [i["content"][0]["text"] for i in first["data"]] == ["m0", "m1"]
    assert first["has_more"] is True
    assert (first["first_id"], first["last_id"]) == (first["data"][0]["id"], first["data"][1]["id"])
    rest = client.get(url, params={"order": "asc", "limit": 2, "after": first["last_id"]}).json()
    assert [i["content"][0]["text"] for i in rest["data"]] == ["m2", "m3"] and rest["has_more"]
    last = client.get(url, params={"order": "asc", "after": rest["last_id"]}).json()
    assert len(last["data"]) == 1 and last["has_more"] is False
    assert_envelope(client.get(url, params={"limit": 0}), 400, "limit")
    assert_envelope(client.get(url, params={"limit": 101}), 400, "limit")
    assert_envelope(client.get(url, params={"after": "msg_nope"}), 400, "after")
    assert client.get("/v1/responses/resp_nope/input_items").status_code == 404


# -- item_reference ----------------------------------------------------------------------------


def test_item_references_resolve_to_stored_items() -> None:
    client, engine = make_client()
    created = create(client, input="first").json()
    [said] = client.get(f"/v1/responses/{created['id']}/input_items").json()["data"]
    answer = created["output"][0]["id"]
    refs = [{"type": "item_reference", "id": i} for i in (said["id"], answer)]
    follow = create(client, input=[*refs, {"role": "user", "content": "next"}])
    assert follow.status_code == 200, follow.text
    prompt = engine.decode(engine.requests[-1].prompt_token_ids)
    assert prompt == "user: first\nassistant: first\nuser: next\n"
    unknown = [{"role": "user", "content": "x"}, {"type": "item_reference", "id": "msg_gone"}]
    error = assert_envelope(create(client, input=unknown), 404, "input[1].id")
    assert "msg_gone" in error["message"]


# -- background --------------------------------------------------------------------------------


def test_background_is_queued_then_completed_by_polling(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.delay = 0.01
    with db_client(tmp_path / "r.db", engine) as client:
        queued = create(client, input="polled", background=True).json()
        assert queued["status"] == "queued" and queued["background"] is True
        Response.model_validate(queued)
        done = wait_for(client, queued["id"], "completed")
        assert done["output"][0]["content"][0]["text"] == "polled"
        assert done["usage"]["output_tokens"] == 6
        items = client.get(f"/v1/responses/{queued['id']}/input_items").json()
        assert items["data"][0]["content"][0]["text"] == "polled"
        error = assert_envelope(create(client, background=True, store=False), 400, "background")
        assert "store" in error["message"]


def test_cancel_aborts_a_background_response_only() -> None:
    client, engine = make_client()
    engine.delay = 0.05
    with client:
        queued = create(client, input="x" * 200, background=True).json()
        wait_for(client, queued["id"], "in_progress")
        time.sleep(0.1)
        cancelled = client.post(f"/v1/responses/{queued['id']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        Response.model_validate(cancelled.json())
        assert queued["id"] in engine.aborted
        assert client.get(f"/v1/responses/{queued['id']}").json()["status"] == "cancelled"
        foreground = create(client).json()
        assert_envelope(client.post(f"/v1/responses/{foreground['id']}/cancel"), 400, None)
        assert client.post("/v1/responses/resp_nope/cancel").status_code == 404


def test_a_background_stream_resumes_after_a_sequence_number() -> None:
    client, engine = make_client()
    engine.delay = 0.02
    with client:
        body = {"model": "fake-model", "input": "resumable", "background": True, "stream": True}
        with client.stream("POST", "/v1/responses", json=body) as stream:
            lines = stream.iter_lines()
            first: list[dict] = []
            while len(first) < 3:  # three events, then the client leaves
                line = next(lines)
                if line.startswith("data: "):
                    first.append(json.loads(line.removeprefix("data: ")))
        assert [data["sequence_number"] for data in first] == [0, 1, 2]
        response_id = first[0]["response"]["id"]
        tail = client.get(
            f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": 4}
        )
        events = events_of(tail.text)
        assert [data["sequence_number"] for _, data in events] == list(range(5, 5 + len(events)))
        assert events[-1][0] == "response.completed"
        everything = events_of(
            client.get(f"/v1/responses/{response_id}", params={"stream": "true"}).text
        )
        assert [data["sequence_number"] for _, data in everything] == list(range(len(everything)))
        assert everything[5:] == events
        final = client.get(f"/v1/responses/{response_id}").json()
        assert final == everything[-1][1]["response"] and final["status"] == "completed"
        Response.model_validate(final)
        foreground = create(client).json()
        resumed = client.get(f"/v1/responses/{foreground['id']}", params={"stream": "true"})
        assert_envelope(resumed, 400, "stream")


def test_shutdown_cancels_running_background_responses(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.delay = 0.05
    registry = ModelRegistry()
    registry.add(engine)
    registry.mark_ready()
    path = tmp_path / "r.db"
    with TestClient(create_app(registry, ServerSettings(responses_db=str(path)))) as client:
        queued = create(client, input="y" * 200, background=True).json()
        wait_for(client, queued["id"], "in_progress")
    assert queued["id"] in engine.aborted
    with db_client(path) as client:
        after = client.get(f"/v1/responses/{queued['id']}").json()
    assert after["status"] == "cancelled"


def test_the_sdk_lists_input_items_cancels_and_polls() -> None:
    client, engine = make_client()
    engine.delay = 0.05
    with client:
        api = sdk(client)
        created = api.responses.create(model="fake-model", input="sdk")
        items = api.responses.input_items.list(created.id)
        assert [item.content[0].text for item in items.data] == ["sdk"]
        running = api.responses.create(model="fake-model", input="z" * 100, background=True)
        assert running.status == "queued" and running.background is True
        assert api.responses.cancel(running.id).status == "cancelled"
        assert api.responses.retrieve(running.id).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            api.responses.cancel(created.id)


def test_sqlite_store_never_evicts_a_response_still_running(tmp_path: Path) -> None:
    store = SqliteResponseStore(str(tmp_path / "r.db"), 1, 10, clock=lambda: 1000.0)
    store.put({"id": "bg", "status": "in_progress"}, [])
    store.put({"id": "x", "status": "completed"}, [])
    store.put({"id": "y", "status": "completed"}, [])
    assert store.get("bg") is not None and store.get("x") is None  # the finished one went
    store.close()
