"""Embedding engine throughput: one request of N texts against N one-text requests, sequential and
concurrent, on a MiniLM-sized random BERT (6 layers, hidden 384, mean pooling) built here.

    .venv/bin/python bench/embed_bench.py [--count 64] [--device cpu]

Prints the best of 3 wall times in ms per way of sending. The loading thread is kept at one torch
thread, as `hearth serve` keeps it: a second OpenMP team in the process slows the engine thread's
forwards several times on a small CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hearth.engine.config import ModelConfig
from hearth.engine.embedding.loader import build_embedding_engine
from hearth.engine.loading.loader import single_threaded
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import EmbeddingRequest
from tests.embedding_fixture import _bert_tokenizer, _write_st_files, sample_texts


def build_minilm(out: Path) -> Path:
    from transformers import BertConfig, BertModel

    tokenizer = _bert_tokenizer()
    tokenizer.save_pretrained(out)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    )
    BertModel(config).save_pretrained(out)
    _write_st_files(out, "mean", 384, None, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    single_threaded()
    folder = build_minilm(Path(tempfile.mkdtemp()))
    config = ModelConfig(id="minilm", source=str(folder), device=args.device, task="embed")
    engine = build_embedding_engine(config, resolve_source(str(folder)))
    texts = sample_texts(args.count)

    async def one_request() -> object:
        return await engine.embed(EmbeddingRequest("b", texts))

    async def sequential() -> object:
        return [await engine.embed(EmbeddingRequest(f"s{i}", [t])) for i, t in enumerate(texts)]

    async def concurrent() -> object:
        requests = [EmbeddingRequest(f"c{i}", [t]) for i, t in enumerate(texts)]
        return await asyncio.gather(*(engine.embed(r) for r in requests))

    ways: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        (f"one request of {args.count} texts", one_request),
        (f"{args.count} sequential one-text requests", sequential),
        (f"{args.count} concurrent one-text requests", concurrent),
    ]
    asyncio.run(one_request())  # warm-up
    for name, way in ways:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            asyncio.run(way())
            times.append(time.perf_counter() - start)
        print(f"{name}: {min(times) * 1000:.0f} ms")
    engine.shutdown()


if __name__ == "__main__":
    main()
