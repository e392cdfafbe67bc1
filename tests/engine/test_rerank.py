"""Rerank engines on tiny random checkpoints against their references, within 1e-5, for 64 pairs
of varied length sent as one batch, one pair at a time and concurrently: a BERT cross-encoder
against sentence-transformers' CrossEncoder.predict, a Qwen3 decoder reranker against
Qwen3-Reranker's scoring with transformers directly. Also: scoring configs read from the
checkpoint, lengths checked and truncated only when asked, the batching thread's buckets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import LoadError
from hearth.engine.loading.sources import resolve_source
from hearth.engine.rerank.engine import RerankEngine
from hearth.engine.rerank.loader import build_rerank_engine
from hearth.engine.types import InvalidRequestError, RerankRequest, RerankResult
from tests.fixtures.rerank import (
    QWEN3_SUFFIX,
    build_tiny_cross_encoder,
    build_tiny_decoder_reranker,
    cross_encoder_reference,
    decoder_reference,
    qwen3_prompt,
    sample_pairs,
)

pytest.importorskip("sentence_transformers")
PAIRS = sample_pairs(64)
TOLERANCE = 1e-5


@pytest.fixture(scope="session")
def cross_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-cross-encoder"))


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return build_tiny_decoder_reranker(
        tmp_path_factory.mktemp("tiny-qwen3-reranker"), smollm_tokenizer_dir
    )


def start(folder: Path, model_id: str, **keys: object) -> RerankEngine:
    config = ModelConfig(id=model_id, source=str(folder), device="cpu", task="rerank", **keys)
    return build_rerank_engine(config, resolve_source(str(folder)))


@pytest.fixture(scope="module")
def cross(cross_dir: Path):
    engine = start(cross_dir, "cross", engine={"max_num_seqs": 16})
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def decoder(decoder_dir: Path):
    engine = start(decoder_dir, "qwen3-rerank", engine={"max_num_seqs": 16})
    yield engine
    engine.shutdown()


def rerank(engine: RerankEngine, pairs: list[tuple[str, str]], **keys: object) -> RerankResult:
    return asyncio.run(engine.rerank(RerankRequest("t", pairs, **keys)))  # type: ignore[arg-type]


def one_by_one_and_concurrent(engine: RerankEngine) -> tuple[list[float], list[float]]:
    single = [rerank(engine, [pair]).scores[0] for pair in PAIRS]

    async def many() -> list[RerankResult]:
        requests = [RerankRequest(f"c{i}", [pair]) for i, pair in enumerate(PAIRS)]
        return await asyncio.gather(*(engine.rerank(r) for r in requests))

    return single, [result.scores[0] for result in asyncio.run(many())]


def assert_close(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want)
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= TOLERANCE, worst


def test_cross_encoder_equals_sentence_transformers(cross: RerankEngine, cross_dir: Path) -> None:
    want = cross_encoder_reference(cross_dir, PAIRS)
    assert len({round(s, 3) for s in want}) > 32  # random weights still tell pairs apart
    batch = rerank(cross, PAIRS)
    assert_close(batch.scores, want)
    single, concurrent = one_by_one_and_concurrent(cross)
    assert_close(single, want)
    assert_close(concurrent, want)
    tokens = sum(len(cross.tokenizer(q, d)["input_ids"]) for q, d in PAIRS)
    assert batch.prompt_tokens == tokens


def test_decoder_equals_transformers_reference(decoder: RerankEngine, decoder_dir: Path) -> None:
    want = decoder_reference(decoder_dir, PAIRS)
    assert all(0 < s < 1 for s in want) and len({round(s, 3) for s in want}) > 32
    batch = rerank(decoder, PAIRS)
    assert_close(batch.scores, want)
    single, concurrent = one_by_one_and_concurrent(decoder)
    assert_close(single, want)
    assert_close(concurrent, want)
    tokens = sum(len(decoder.tokenizer(qwen3_prompt(q, d))["input_ids"]) for q, d in PAIRS)
    assert batch.prompt_tokens == tokens


def test_decoder_template_and_tokens_from_models_yaml(decoder_dir: Path) -> None:
    template = "Query: {query}\nDocument: {document}\nRelevant:"
    engine = start(
        decoder_dir, "custom", rerank={"template": template, "answer_tokens": [" no", " yes"]}
    )
    try:
        got = rerank(engine, PAIRS[:8]).scores
    finally:
        engine.shutdown()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(decoder_dir)
    no, yes = (tokenizer.encode(t, add_special_tokens=False)[0] for t in (" no", " yes"))
    for (query, document), score in zip(PAIRS[:8], got, strict=True):
        text = template.replace("{query}", query).replace("{document}", document)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1]
        assert abs(score - float(torch.softmax(logits[[no, yes]], -1)[1])) <= TOLERANCE


def test_braces_in_texts_stay_as_they_are(decoder: RerankEngine) -> None:
    text, start, end = decoder.scorer.render("{document}?", "a {query} b")
    assert "<Query>: {document}?\n<Document>: a {query} b<|im_end|>" in text
    assert text[start:end] == "a {query} b"


def test_too_long_is_an_error_naming_the_pair_unless_truncation_is_asked(
    cross: RerankEngine, decoder: RerankEngine
) -> None:
    long_doc = " ".join(["hearth fire"] * 200)  # over 256 tokens (cross) and 512 (decoder)
    pairs = [PAIRS[0], ("what is it?", long_doc * 2)]
    for engine in (cross, decoder):
        with pytest.raises(InvalidRequestError, match=r"documents\[1\].*truncate_prompt_tokens"):
            rerank(engine, pairs)
        with pytest.raises(InvalidRequestError, match=r"text_2\[1\]") as err:
            rerank(engine, pairs, field="text_2")
        assert err.value.param == "text_2"
        cut = rerank(engine, pairs, truncate_prompt_tokens=-1)
        first = rerank(engine, [PAIRS[0]])
        assert cut.prompt_tokens == first.prompt_tokens + engine.max_len  # the long one cut
        assert abs(cut.scores[0] - first.scores[0]) <= TOLERANCE
        with pytest.raises(InvalidRequestError, match="truncate_prompt_tokens") as err:
            rerank(engine, pairs, truncate_prompt_tokens=engine.max_len + 1)
        assert err.value.param == "truncate_prompt_tokens"


def test_cross_encoder_truncation_is_crossencoders(cross: RerankEngine, cross_dir: Path) -> None:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(cross_dir), device="cpu", max_length=24)
    want = [float(s) for s in model.predict([list(p) for p in PAIRS[:16]])]
    assert_close(rerank(cross, PAIRS[:16], truncate_prompt_tokens=24).scores, want)


def test_decoder_truncation_cuts_the_document_end(decoder: RerankEngine, decoder_dir: Path) -> None:
    query, document = PAIRS[3]
    full = decoder.tokenizer(qwen3_prompt(query, document))["input_ids"]
    got = rerank(decoder, [(query, document)], truncate_prompt_tokens=len(full) - 5)
    ids = decoder._prompt(RerankRequest("t", [(query, document)]), 0, len(full) - 5)
    assert len(ids) == len(full) - 5 == got.prompt_tokens
    end = len(full) - len(decoder.tokenizer(QWEN3_SUFFIX)["input_ids"])  # the document's end
    assert ids == full[: end - 5] + full[end:]  # its last 5 tokens dropped, the template kept
    with pytest.raises(InvalidRequestError, match="without its document") as err:
        rerank(decoder, [(query, document)], truncate_prompt_tokens=10)
    assert err.value.param == "truncate_prompt_tokens"


def test_empty_pairs_and_generation_calls_are_400s(cross: RerankEngine) -> None:
    with pytest.raises(InvalidRequestError, match="documents must not be empty"):
        rerank(cross, [])
    with pytest.raises(InvalidRequestError, match="rerank model: it serves /v1/rerank"):
        cross.encode_chat([{"role": "user", "content": "hi"}])


def test_activation_read_where_crossencoder_reads_it(cross_dir: Path, tmp_path: Path) -> None:
    import shutil

    from transformers import AutoConfig

    from hearth.engine.config import RerankSettings
    from hearth.engine.rerank.scoring import RerankConfigError, read_scorer

    folder = tmp_path / "ce"
    shutil.copytree(cross_dir, folder)
    hf = AutoConfig.from_pretrained(folder)
    assert read_scorer(folder, hf, RerankSettings(), None).activation == "sigmoid"
    st = json.loads((folder / "config_sentence_transformers.json").read_text())
    st["activation_fn"] = "torch.nn.modules.linear.Identity"
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st))
    assert read_scorer(folder, hf, RerankSettings(), None).activation == "identity"
    override = RerankSettings(activation="sigmoid")
    assert read_scorer(folder, hf, override, None).activation == "sigmoid"
    st["activation_fn"] = "mypackage.Custom"  # untrusted: CrossEncoder's default
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st))
    assert read_scorer(folder, hf, RerankSettings(), None).activation == "sigmoid"
    hf.num_labels = 3
    with pytest.raises(RerankConfigError, match="3 labels"):
        read_scorer(folder, hf, RerankSettings(), None)


def test_identity_activation_equals_crossencoder(cross_dir: Path, tmp_path: Path) -> None:
    import shutil

    from sentence_transformers import CrossEncoder

    folder = tmp_path / "ce-identity"
    shutil.copytree(cross_dir, folder)
    path = folder / "config_sentence_transformers.json"
    st = json.loads(path.read_text())
    path.write_text(json.dumps({**st, "activation_fn": "torch.nn.modules.linear.Identity"}))
    want = [float(s) for s in CrossEncoder(str(folder), device="cpu").predict(PAIRS[:16])]
    assert any(s < 0 or s > 1 for s in want) or len(set(want)) > 1
    engine = start(folder, "identity")
    try:
        assert_close(rerank(engine, PAIRS[:16]).scores, want)
    finally:
        engine.shutdown()


def test_load_errors_are_one_line(tmp_path: Path, tiny_llama_dir: Path) -> None:
    with pytest.raises(LoadError, match=r"rerank\.template"):
        start(tiny_llama_dir, "llama-rerank")  # a llama CausalLM: no preset to assume
    with pytest.raises(LoadError, match="exactly one \\{document\\}"):
        start(tiny_llama_dir, "bad", rerank={"template": "{query}"})
    config = ModelConfig(id="s", source=str(tiny_llama_dir), task="score")
    assert config.task == "rerank"  # vLLM's name


def test_buckets_are_the_embedding_engines(cross: RerankEngine) -> None:
    from hearth.engine.batched.thread import Job

    lengths = [3, 50, 4, 5, 120, 6, 48, 7]
    job = Job([[1] * n for n in lengths], None, None, None)  # type: ignore[arg-type]
    buckets = cross._buckets([(job, i) for i in range(len(lengths))])
    assert [[lengths[i] for _, i in b] for b in buckets] == [[3, 4, 5, 6, 7], [48, 50], [120]]
