"""The rerank and score routes over the app with a fake rerank engine (score = the document's
length): pairing (one to one, one to many, many to many), sorting with indices, top_n,
return_documents, usage, the 400s that name the field, the pairs the engine receives."""

from __future__ import annotations

import dataclasses

import pytest
from fastapi.testclient import TestClient

from hearth.engine.types import RerankRequest, RerankResult
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from tests.fixtures.fakes import FakeEngine


class FakeReranker(FakeEngine):
    """Scores a pair by its document's length; keeps the requests it saw."""

    max_inputs = 8

    def __init__(self) -> None:
        super().__init__("ranker")
        self.info = dataclasses.replace(self.info, task="rerank")
        self.seen: list[RerankRequest] = []

    async def rerank(self, request: RerankRequest) -> RerankResult:
        self.seen.append(request)
        scores = [float(len(document)) for _, document in request.pairs]
        return RerankResult(scores, sum(len(q) + len(d) for q, d in request.pairs))


@pytest.fixture
def app() -> tuple[TestClient, FakeReranker]:
    registry = ModelRegistry()
    ranker = FakeReranker()
    registry.add(ranker)
    registry.add(FakeEngine("chat"))
    registry.mark_ready()
    return TestClient(create_app(registry)), ranker


def test_rerank_sorted_with_indices_top_n_and_documents(app) -> None:
    client, ranker = app
    docs = ["bb", {"text": "dddd"}, "a", "ccc"]
    body = {"model": "ranker", "query": "q", "documents": docs}
    out = client.post("/v1/rerank", json=body).json()
    assert [r["index"] for r in out["results"]] == [1, 3, 0, 2]
    assert [r["relevance_score"] for r in out["results"]] == [4.0, 3.0, 2.0, 1.0]
    assert out["results"][0]["document"] == {"text": "dddd"}
    assert out["usage"] == {"prompt_tokens": 14, "total_tokens": 14}
    assert ranker.seen[-1].pairs == [("q", "bb"), ("q", "dddd"), ("q", "a"), ("q", "ccc")]
    assert ranker.seen[-1].field == "documents"
    for path in ("/rerank", "/v2/rerank"):
        short = client.post(path, json={**body, "top_n": 2, "return_documents": False}).json()
        assert short["results"] == [
            {"index": 1, "relevance_score": 4.0},
            {"index": 3, "relevance_score": 3.0},
        ]
    cut = client.post("/v1/rerank", json={**body, "truncate_prompt_tokens": 7})
    assert cut.status_code == 200 and ranker.seen[-1].truncate_prompt_tokens == 7


def test_score_pairings(app) -> None:
    client, ranker = app
    one = client.post("/score", json={"model": "ranker", "text_1": "q", "text_2": "dd"}).json()
    assert one["object"] == "list" and one["data"] == [
        {"index": 0, "object": "score", "score": 2.0}
    ]
    assert one["usage"] == {"prompt_tokens": 3, "total_tokens": 3, "completion_tokens": 0}
    client.post("/score", json={"model": "ranker", "text_1": ["q"], "text_2": ["a", "bb"]})
    assert ranker.seen[-1].pairs == [("q", "a"), ("q", "bb")]
    out = client.post(
        "/v1/score", json={"model": "ranker", "text_1": ["x", "y"], "text_2": ["a", "bb"]}
    )
    assert ranker.seen[-1].pairs == [("x", "a"), ("y", "bb")] and ranker.seen[-1].field == "text_2"
    assert [d["score"] for d in out.json()["data"]] == [1.0, 2.0]


RERANK = {"model": "ranker", "query": "q"}
SCORE = {"model": "ranker", "text_1": "a"}
CASES = [
    ("/v1/rerank", {**RERANK, "documents": []}, "documents", "empty"),
    ("/v1/rerank", {**RERANK, "documents": ["d"] * 9}, "documents", "at most 8"),
    ("/v1/rerank", {**RERANK, "documents": [{"txt": "d"}]}, "documents", ""),
    ("/v1/rerank", {**RERANK, "documents": ["d"], "top_n": -1}, "top_n", ""),
    ("/score", {**SCORE, "text_1": ["a", "b"], "text_2": ["c"] * 3}, "text_2", "one to many"),
    ("/score", {**SCORE, "text_2": []}, "text_2", "empty"),
    (
        "/score",
        {**SCORE, "text_2": "b", "truncate_prompt_tokens": -2},
        "truncate_prompt_tokens",
        "",
    ),
    ("/score", {**SCORE, "model": "chat", "text_2": "b"}, "model", "does not serve /v1/rerank"),
    ("/v1/embeddings", {"model": "ranker", "input": "a"}, "model", "'ranker' is a rerank model"),
]


@pytest.mark.parametrize(("path", "body", "param", "message"), CASES)
def test_400s_name_the_field(app, path: str, body: dict, param: str, message: str) -> None:
    client, _ = app
    reply = client.post(path, json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param)
    assert message in error["message"]
