"""POST /v1/rerank (/rerank, /v2/rerank) and /score through raw HTTP (httpx) against a live
`hearth serve` with a tiny BERT cross-encoder and a tiny Qwen3 decoder reranker beside an
embedding model and a generation model: scores equal CrossEncoder.predict and the transformers
reference within 1e-5 for 64 pairs (one to many, many to many, one pair per request); results
sorted with their indices, top_n, return_documents, usage; 400s naming the field or document;
/v1/models and /metrics show the task."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.fixtures.embedding import build_tiny_bert
from tests.fixtures.rerank import (
    build_tiny_cross_encoder,
    build_tiny_decoder_reranker,
    cross_encoder_reference,
    decoder_reference,
    sample_pairs,
)
from tests.fixtures.server import running_server

pytestmark = pytest.mark.slow
pytest.importorskip("sentence_transformers")
PAIRS = sample_pairs(64)
QUERY = "what fire does the hearth model search?"
DOCUMENTS = [document for _, document in PAIRS]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path, tiny_llama_dir):
    root = tmp_path_factory.mktemp("live-rerank")
    cross = build_tiny_cross_encoder(root / "cross")
    decoder = build_tiny_decoder_reranker(root / "qwen3-rerank", smollm_tokenizer_dir)
    bert = build_tiny_bert(root / "bert")
    models = [
        {"id": "cross", "source": str(cross), "device": "cpu", "task": "rerank"},
        {"id": "qwen3-rerank", "source": str(decoder), "device": "cpu", "task": "score"},
        {"id": "bert", "source": str(bert), "device": "cpu", "task": "embed"},
        {
            "id": "tiny",
            "source": str(tiny_llama_dir),
            "device": "cpu",
            "engine": {"kv_cache_memory": "64MiB", "autotune": "off"},
        },
    ]
    config = root / "models.yaml"
    config.write_text(json.dumps({"models": models}))
    want = {
        "cross": (
            cross_encoder_reference(cross, PAIRS),
            cross_encoder_reference(cross, [(QUERY, d) for d in DOCUMENTS]),
        ),
        "qwen3-rerank": (
            decoder_reference(decoder, PAIRS),
            decoder_reference(decoder, [(QUERY, d) for d in DOCUMENTS]),
        ),
    }
    with running_server("--config", str(config)) as (base, _):
        yield base.removesuffix("/v1"), want


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=120)


def close(got: list[float], want: list[float]) -> bool:
    return max(abs(a - b) for a, b in zip(got, want, strict=True)) <= TOLERANCE


@pytest.mark.parametrize("model", ["cross", "qwen3-rerank"])
def test_score_many_to_many_and_one_pair_at_a_time(server, model: str) -> None:
    base, want = server
    pairs_want, _ = want[model]
    body = {"model": model, "text_1": [q for q, _ in PAIRS], "text_2": DOCUMENTS}
    reply = post(base, "/score", body)
    assert reply.status_code == 200, reply.text
    out = reply.json()
    assert out["object"] == "list" and out["model"] == model and out["id"].startswith("score")
    assert [d["index"] for d in out["data"]] == list(range(64))
    assert {d["object"] for d in out["data"]} == {"score"}
    assert close([d["score"] for d in out["data"]], pairs_want)
    usage = out["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 64 and usage["completion_tokens"] == 0
    single = [
        post(base, "/score", {"model": model, "text_1": q, "text_2": d}).json()["data"][0]["score"]
        for q, d in PAIRS
    ]
    assert close(single, pairs_want)


@pytest.mark.parametrize("model", ["cross", "qwen3-rerank"])
def test_rerank_one_query_sorted_with_indices(server, model: str) -> None:
    base, want = server
    _, query_want = want[model]
    order = sorted(range(64), key=lambda i: query_want[i], reverse=True)
    body = {"model": model, "query": QUERY, "documents": DOCUMENTS}
    out = post(base, "/v1/rerank", body).json()
    assert out["id"].startswith("rerank") and out["model"] == model
    results = out["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in results) == list(range(64))
    assert close([query_want[r["index"]] for r in results], scores)
    assert [r["index"] for r in results][:5] == order[:5]
    assert all(r["document"]["text"] == DOCUMENTS[r["index"]] for r in results)
    assert out["usage"]["total_tokens"] > 64
    one_to_many = post(base, "/score", {"model": model, "text_1": QUERY, "text_2": DOCUMENTS})
    assert close([d["score"] for d in one_to_many.json()["data"]], query_want)
    as_objects = [{"text": d} for d in DOCUMENTS[:10]]
    for path in ("/rerank", "/v2/rerank"):
        short = post(
            base,
            path,
            {
                "model": model,
                "query": QUERY,
                "documents": as_objects,
                "top_n": 3,
                "return_documents": False,
            },
        ).json()["results"]
        top = sorted(range(10), key=lambda i: query_want[i], reverse=True)[:3]
        assert [r["index"] for r in short] == top
        assert all("document" not in r for r in short)


def error(reply: httpx.Response) -> dict:
    assert reply.status_code == 400, reply.text
    return reply.json()["error"]


def test_errors_name_the_field_or_document(server) -> None:
    base, _ = server
    rerank = {"model": "cross", "query": QUERY}
    assert error(post(base, "/v1/rerank", {**rerank, "documents": []}))["param"] == "documents"
    long_doc = " ".join(["hearth fire"] * 300)
    documents = [DOCUMENTS[0], long_doc]
    err = error(post(base, "/v1/rerank", {**rerank, "documents": documents}))
    assert err["param"] == "documents" and "documents[1]" in err["message"]
    assert "truncate_prompt_tokens" in err["message"]
    cut = post(base, "/v1/rerank", {**rerank, "documents": documents, "truncate_prompt_tokens": -1})
    assert cut.status_code == 200 and len(cut.json()["results"]) == 2
    err = error(
        post(base, "/score", {"model": "qwen3-rerank", "text_1": QUERY, "text_2": documents})
    )
    assert err["param"] == "text_2" and "text_2[1]" in err["message"]
    err = error(post(base, "/score", {"model": "cross", "text_1": ["a", "b"], "text_2": ["c"] * 3}))
    assert err["param"] == "text_2"
    assert (
        error(post(base, "/score", {"model": "cross", "text_1": [], "text_2": "x"}))["param"]
        == "text_1"
    )
    err = error(
        post(base, "/v1/rerank", {**rerank, "documents": ["x"], "truncate_prompt_tokens": 10**6})
    )
    assert err["param"] == "truncate_prompt_tokens"


def test_wrong_task_routes_models_and_metrics(server) -> None:
    base, _ = server
    err = error(post(base, "/v1/rerank", {"model": "bert", "query": "q", "documents": ["d"]}))
    assert err["param"] == "model" and "'bert' is an embedding model" in err["message"]
    err = error(post(base, "/score", {"model": "tiny", "text_1": "q", "text_2": "d"}))
    assert "'tiny' is a generation model: it does not serve /v1/rerank" in err["message"]
    err = error(post(base, "/v1/embeddings", {"model": "cross", "input": "hi"}))
    assert "'cross' is a rerank model: it serves /v1/rerank and /score only" in err["message"]
    chat = {"model": "qwen3-rerank", "messages": [{"role": "user", "content": "hi"}]}
    assert "rerank model" in error(post(base, "/v1/chat/completions", chat))["message"]
    tasks = {m["id"]: m["task"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
    assert tasks == {
        "cross": "rerank",
        "qwen3-rerank": "rerank",
        "bert": "embed",
        "tiny": "generate",
    }
    metrics = httpx.get(f"{base}/metrics").text
    assert 'hearth_model_task{model="cross",task="rerank"} 1.0' in metrics
