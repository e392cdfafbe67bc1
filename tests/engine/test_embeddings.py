"""Embeddings: sentence-transformers pooling configs, the embedding engine against transformers +
pooling on tiny random checkpoints, and POST /v1/embeddings over the app (errors, cross-task
400s, /v1/models and /metrics tasks). The official SDK against a live server:
tests/live/test_embeddings.py."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from hearth.engine.config import EmbeddingSettings, ModelConfig
from hearth.engine.embedding.engine import EmbeddingEngine
from hearth.engine.embedding.loader import build_embedding_engine
from hearth.engine.embedding.pooling import PoolingConfigError, finish, pool, read_pooling_config
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import EmbeddingRequest, InvalidRequestError
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from tests.fixtures.embedding import (
    QUERY_PROMPT,
    build_tiny_bert,
    build_tiny_decoder_embedder,
    cosine,
    reference_vectors,
    sample_texts,
)
from tests.fixtures.fakes import FakeEngine

TEXTS = sample_texts(64)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return build_tiny_decoder_embedder(
        tmp_path_factory.mktemp("tiny-qwen2-embed"), smollm_tokenizer_dir
    )


def start(folder: Path, model_id: str, **keys: object) -> EmbeddingEngine:
    config = ModelConfig(id=model_id, source=str(folder), device="cpu", task="embed", **keys)
    return build_embedding_engine(config, resolve_source(str(folder)))


@pytest.fixture(scope="module")
def bert(bert_dir: Path):
    engine = start(bert_dir, "bert", embedding={"max_inputs": 64}, max_model_len=64)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def decoder(decoder_dir: Path):
    engine = start(decoder_dir, "qwen-embed", engine={"max_num_seqs": 16})
    yield engine
    engine.shutdown()


def embed(engine: EmbeddingEngine, inputs: list, **kwargs: object) -> list[list[float]]:
    return asyncio.run(engine.embed(EmbeddingRequest("t", inputs, **kwargs))).embeddings


# -- pooling config -----------------------------------------------------------------------------


def test_reads_sentence_transformers_files(bert_dir: Path, decoder_dir: Path) -> None:
    from transformers import AutoConfig

    bert = read_pooling_config(bert_dir, AutoConfig.from_pretrained(bert_dir), EmbeddingSettings())
    assert (bert.mode, bert.normalize, bert.max_seq_length) == ("mean", True, 128)
    assert bert.default_prompt_name is None and bert.matryoshka_dimensions is None
    hf = AutoConfig.from_pretrained(decoder_dir)
    dec = read_pooling_config(decoder_dir, hf, EmbeddingSettings())
    assert (dec.mode, dec.default_prompt_name, dec.prompts["query"]) == (
        "last",
        "query",
        QUERY_PROMPT,
    )
    assert dec.matryoshka_dimensions == [16, 32, 64]
    over = EmbeddingSettings(pooling="cls", normalize=False, default_prompt_name="document")
    dec = read_pooling_config(decoder_dir, hf, over)
    assert (dec.mode, dec.normalize, dec.default_prompt_name) == ("cls", False, "document")


def test_defaults_without_files_and_refusals(tmp_path: Path, bert_dir: Path) -> None:
    from transformers import BertConfig, Qwen2Config

    settings = EmbeddingSettings()
    assert read_pooling_config(tmp_path, BertConfig(), settings).mode == "cls"
    assert read_pooling_config(tmp_path, Qwen2Config(), settings).mode == "last"
    assert read_pooling_config(tmp_path, Qwen2Config(), settings).normalize
    modules = json.loads((bert_dir / "modules.json").read_text())
    dense = {"idx": 3, "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    (tmp_path / "modules.json").write_text(json.dumps([*modules, dense]))
    with pytest.raises(PoolingConfigError, match="Dense"):
        read_pooling_config(tmp_path, BertConfig(), settings)
    (tmp_path / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize
    (tmp_path / "1_Pooling").mkdir()
    pooling = {"pooling_mode_max_tokens": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(PoolingConfigError, match="max_tokens"):
        read_pooling_config(tmp_path, BertConfig(), settings)
    pooling = {"pooling_mode_cls_token": True}
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    config = read_pooling_config(tmp_path, BertConfig(), settings)
    assert (config.mode, config.normalize) == ("cls", False)
    with pytest.raises(PoolingConfigError, match="nope"):
        read_pooling_config(tmp_path, BertConfig(), EmbeddingSettings(default_prompt_name="nope"))


def test_pool_on_padded_rows_equals_unpadded() -> None:
    hidden = torch.randn(2, 5, 8)  # [B, T, H]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.allclose(pool(hidden, mask, "mean")[0], hidden[0, :3].mean(0))
    assert torch.equal(pool(hidden, mask, "last")[0], hidden[0, 2])
    assert torch.equal(pool(hidden, mask, "cls")[1], hidden[1, 0])
    out = finish(torch.tensor([[3.0, 4.0, 12.0]]), normalize=False, dimensions=2)
    assert torch.allclose(out, torch.tensor([[0.6, 0.8]]))


# -- the engine ---------------------------------------------------------------------------------


def test_bert_batch_matches_transformers_mean_pooling(
    bert: EmbeddingEngine, bert_dir: Path
) -> None:
    got = embed(bert, TEXTS)
    want = reference_vectors(bert_dir, TEXTS, "mean")
    assert len(got) == 64 and all(len(v) == 32 for v in got)
    assert min(cosine(a, b) for a, b in zip(got, want, strict=True)) >= 0.9999


def test_decoder_last_token_with_default_and_named_prompt(
    decoder: EmbeddingEngine, decoder_dir: Path
) -> None:
    texts = TEXTS[:20]
    got = embed(decoder, texts)  # default prompt: query
    want = reference_vectors(decoder_dir, texts, "last", prefix=QUERY_PROMPT)
    assert min(cosine(a, b) for a, b in zip(got, want, strict=True)) >= 0.9999
    plain = embed(decoder, texts, prompt_name="document")
    want = reference_vectors(decoder_dir, texts, "last")
    assert min(cosine(a, b) for a, b in zip(plain, want, strict=True)) >= 0.9999
    with pytest.raises(InvalidRequestError, match="query") as err:
        embed(decoder, texts, prompt_name="passage")
    assert err.value.param == "prompt_name"


def test_token_id_inputs_and_concurrent_requests(bert: EmbeddingEngine, bert_dir: Path) -> None:
    ids = [bert.tokenizer(t)["input_ids"] for t in TEXTS[:8]]
    assert torch.allclose(torch.tensor(embed(bert, ids)), torch.tensor(embed(bert, TEXTS[:8])))

    async def many() -> list:
        requests = [EmbeddingRequest(f"r{i}", [t]) for i, t in enumerate(TEXTS[:12])]
        return await asyncio.gather(*(bert.embed(r) for r in requests))

    results = asyncio.run(many())
    want = reference_vectors(bert_dir, TEXTS[:12], "mean")
    for result, ref, text in zip(results, want, TEXTS, strict=False):
        assert cosine(result.embeddings[0], ref) >= 0.9999
        assert result.prompt_tokens == len(bert.tokenizer(text)["input_ids"])


def test_buckets_by_length_within_the_token_budget(decoder: EmbeddingEngine) -> None:
    from hearth.engine.batched.thread import Job

    lengths = [3, 50, 4, 5, 120, 6, 48, 7, 900, 700, 800, 600]  # max_num_batched_tokens 2048
    job = Job([[1] * n for n in lengths], None, None, None)  # type: ignore[arg-type]
    buckets = decoder._buckets([(job, i) for i in range(len(lengths))])
    assert [[lengths[i] for _, i in b] for b in buckets] == [
        [3, 4, 5, 6, 7],
        [48, 50],
        [120],
        [600, 700],
        [800, 900],
    ]


def test_matryoshka_dimensions(decoder: EmbeddingEngine, bert: EmbeddingEngine) -> None:
    full = embed(decoder, TEXTS[:4])
    short = embed(decoder, TEXTS[:4], dimensions=32)
    for f, s in zip(full, short, strict=True):
        want = torch.nn.functional.normalize(torch.tensor(f[:32]), dim=0)
        assert torch.allclose(torch.tensor(s), want, atol=1e-6)
    with pytest.raises(InvalidRequestError, match=r"\[16, 32, 64\]") as err:
        embed(decoder, TEXTS[:1], dimensions=24)
    assert err.value.param == "dimensions"
    with pytest.raises(InvalidRequestError, match="Matryoshka") as err:
        embed(bert, TEXTS[:1], dimensions=16)
    assert err.value.param == "dimensions"


def test_input_errors_name_the_input(bert: EmbeddingEngine) -> None:
    long_text = " ".join(["hearth"] * 70)  # 72 tokens > max_model_len 64
    cases = [
        (["ok", long_text], r"input\[1\] has 72 tokens.*64"),
        (["ok", ""], r"input\[1\] is an empty string"),
        ([[2, 3], []], r"input\[1\] is an empty list"),
        ([[2, 10_000]], r"input\[0\] has token ids outside"),
        ([], "must not be empty"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidRequestError, match=message) as err:
            embed(bert, inputs)
        assert err.value.param == "input"


# -- over HTTP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(bert: EmbeddingEngine, decoder: EmbeddingEngine) -> TestClient:
    registry = ModelRegistry()
    for engine in (bert, decoder, FakeEngine()):
        registry.add(engine)
    registry.mark_ready()
    return TestClient(create_app(registry))


def post(client: TestClient, **body: object):
    return client.post("/v1/embeddings", json={"model": "bert", **body})


def test_http_float_and_base64(client: TestClient, bert: EmbeddingEngine) -> None:
    floats = post(client, input=TEXTS[:5]).json()
    assert floats["object"] == "list" and floats["model"] == "bert"
    tokens = sum(len(bert.tokenizer(t)["input_ids"]) for t in TEXTS[:5])
    assert floats["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert [d["index"] for d in floats["data"]] == list(range(5))
    assert {d["object"] for d in floats["data"]} == {"embedding"}
    packed = post(client, input=TEXTS[:5], encoding_format="base64").json()
    for f, b in zip(floats["data"], packed["data"], strict=True):
        raw = base64.b64decode(b["embedding"])
        assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == f["embedding"]
    one = post(client, input=TEXTS[0]).json()["data"]
    # alone or in a padded batch of 5: the same values up to float32 rounding (the matmul
    # library may block a batch of other shapes differently, e.g. on AVX2-only CPUs)
    assert torch.allclose(
        torch.tensor(one[0]["embedding"]), torch.tensor(floats["data"][0]["embedding"]), atol=1e-6
    )
    ids = bert.tokenizer(TEXTS[0])["input_ids"]
    by_ids = post(client, input=ids).json()["data"][0]["embedding"]
    assert torch.allclose(torch.tensor(by_ids), torch.tensor(one[0]["embedding"]))


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": []}, "input", "empty"),
        ({"input": ""}, "input", "empty"),
        ({"input": ["a"] * 65}, "input", "at most 64"),
        ({"input": ["a", " ".join(["fire"] * 80)]}, "input", "input[1]"),
        ({"input": ["a", 3]}, "input[1]", ""),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", ""),
        ({"input": "a", "dimensions": 16}, "dimensions", "Matryoshka"),
        ({"input": "a", "dimensions": 0}, "dimensions", ""),
        ({"input": "a", "model": "fake-model"}, "model", "'fake-model' is a generation model"),
    ],
)
def test_http_errors_name_the_field(
    client: TestClient, body: dict, param: str, message: str
) -> None:
    response = post(client, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_generation_routes_refuse_an_embedding_model(client: TestClient) -> None:
    chat = {"model": "bert", "messages": [{"role": "user", "content": "hi"}]}
    for path, body in [
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"model": "bert", "prompt": "hi"}),
        ("/v1/responses", {"model": "qwen-embed", "input": "hi"}),
    ]:
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "model" and "is an embedding model" in error["message"]
        assert body["model"] in error["message"]


def test_models_metrics_and_tokenize_know_the_task(client: TestClient) -> None:
    tasks = {m["id"]: m["task"] for m in client.get("/v1/models").json()["data"]}
    assert tasks == {"bert": "embed", "qwen-embed": "embed", "fake-model": "generate"}
    assert client.get("/v1/models/bert").json()["task"] == "embed"
    page = client.get("/metrics").text
    assert 'hearth_model_task{model="bert",task="embed"} 1.0' in page
    assert 'hearth_model_task{model="fake-model",task="generate"} 1.0' in page
    counted = client.post("/tokenize", json={"model": "bert", "prompt": "hearth fire"}).json()
    assert counted["count"] == 4 and counted["max_model_len"] == 64


def test_models_yaml_embedding_keys_are_validated() -> None:
    from hearth.engine.config import ConfigError, parse_config

    good = {"id": "e", "source": "x", "task": "embed", "embedding": {"pooling": "mean"}}
    assert parse_config({"models": [good]}).models[0].embedding.pooling == "mean"
    assert parse_config({"models": [{"id": "g", "source": "x"}]}).models[0].task == "generate"
    for bad, key in [
        ({**good, "task": "classify"}, "'task'"),
        ({**good, "embedding": {"pooling": "max"}}, "'embedding.pooling'"),
        ({**good, "embedding": {"max_inputs": 0}}, "'embedding.max_inputs'"),
        ({**good, "embedding": {"pooling_mode": "cls"}}, "unknown key 'embedding.pooling_mode'"),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_config({"models": [bad]}, "models.yaml")


def test_gguf_source_embeds_like_its_conversion(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    """`task: embed` takes a GGUF file as generation does: converted once (engine/loading/), then
    the decoder's last token pooled and normalised, equal to transformers on the conversion."""
    from hearth.engine.loading.gguf_cache import converted_checkpoint
    from tests.fixtures.gguf import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", smollm_tokenizer_dir)
    engine = start(gguf, "gguf-embed", dtype="float32", max_model_len=64)
    try:
        assert engine.info.task == "embed"
        request = EmbeddingRequest("g", TEXTS[:3])
        got = asyncio.run(engine.embed(request)).embeddings
    finally:
        engine.shutdown()
    folder = converted_checkpoint(gguf, "float32")
    want = reference_vectors(folder, TEXTS[:3], "last")
    assert all(cosine(a, b) > 0.9999 for a, b in zip(got, want, strict=True))
