"""The official openai SDK against a live `hearth serve` with two tiny embedding models (a BERT
encoder with mean pooling, a Qwen2 decoder embedder with last-token pooling and an instruction
prompt) next to a tiny generation model: 64 strings, float and base64, equal transformers +
pooling; Matryoshka `dimensions`; the cross-task 400s."""

from __future__ import annotations

import json
import struct
import time
from base64 import b64decode
from pathlib import Path

import pytest

from tests.fixtures.embedding import (
    QUERY_PROMPT,
    build_tiny_bert,
    build_tiny_decoder_embedder,
    cosine,
    reference_vectors,
    sample_texts,
)
from tests.fixtures.server import running_server

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")
TEXTS = sample_texts(64)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path, tiny_llama_dir):
    root = tmp_path_factory.mktemp("live-embed")
    bert = build_tiny_bert(root / "bert")
    decoder = build_tiny_decoder_embedder(root / "qwen-embed", smollm_tokenizer_dir)
    embed = {"device": "cpu", "task": "embed"}
    models = [
        {"id": "bert", "source": str(bert), **embed},
        {"id": "qwen-embed", "source": str(decoder), **embed, "engine": {"max_num_seqs": 32}},
        {
            "id": "tiny",
            "source": str(tiny_llama_dir),
            "device": "cpu",
            "engine": {"kv_cache_memory": "64MiB", "autotune": "off"},
        },
    ]
    config = root / "models.yaml"
    config.write_text(json.dumps({"models": models}))
    with running_server("--config", str(config)) as (base, _):
        yield base, bert, decoder


def client_of(base: str):
    return openai.OpenAI(base_url=base, api_key="unused", max_retries=0)


def test_sdk_batch_of_64_equals_transformers_float_and_base64(server) -> None:
    base, bert, decoder = server
    client = client_of(base)
    mode_dims = {"bert": 32, "qwen-embed": 64}
    for model, folder, mode, prefix in [
        ("bert", bert, "mean", ""),
        ("qwen-embed", decoder, "last", QUERY_PROMPT),
    ]:
        want = reference_vectors(folder, TEXTS, mode, prefix)
        # omitted: the SDK asks for base64 and decodes it; given: it returns what came
        for encoding in ("float", "base64", None):
            start = time.perf_counter()
            reply = client.embeddings.create(
                model=model, input=TEXTS, encoding_format=encoding or openai.omit
            )
            seconds = time.perf_counter() - start
            tokens = reply.usage.prompt_tokens
            print(f"{model} {encoding}: 64 inputs, {tokens} tokens, {seconds:.3f} s")
            assert [d.index for d in reply.data] == list(range(64))
            got = [d.embedding for d in reply.data]
            if encoding == "base64":
                got = [list(struct.unpack(f"<{mode_dims[model]}f", b64decode(v))) for v in got]
            assert min(cosine(a, b) for a, b in zip(got, want, strict=True)) >= 0.9999
            assert reply.usage.total_tokens == tokens > 64


def test_sdk_token_ids_and_dimensions(server) -> None:
    base, _, decoder = server
    client = client_of(base)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(decoder)(QUERY_PROMPT + TEXTS[0])["input_ids"]
    by_ids = client.embeddings.create(model="qwen-embed", input=[ids]).data[0].embedding
    by_text = client.embeddings.create(model="qwen-embed", input=TEXTS[0]).data[0].embedding
    assert cosine(by_ids, by_text) >= 0.9999
    short = client.embeddings.create(model="qwen-embed", input=TEXTS[0], dimensions=16)
    vector = short.data[0].embedding
    assert len(vector) == 16 and abs(sum(x * x for x in vector) - 1) < 1e-5
    assert cosine(vector, by_text[:16]) >= 0.9999
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="bert", input="hi", dimensions=16)


def test_sdk_cross_task_errors_and_models(server) -> None:
    base, _, _ = server
    client = client_of(base)
    with pytest.raises(openai.BadRequestError, match="'bert' is an embedding model"):
        client.chat.completions.create(model="bert", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'tiny' is a generation model"):
        client.embeddings.create(model="tiny", input="hi")
    tasks = {m.id: m.model_extra["task"] for m in client.models.list().data}
    assert tasks == {"bert": "embed", "qwen-embed": "embed", "tiny": "generate"}
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.usage.completion_tokens == 2  # generation still served beside them
