"""Embedding engine throughput: one request of N texts against N one-text requests, sequential and
concurrent, on a MiniLM-sized random BERT (6 layers, hidden 384, mean pooling) built here; with
`--compare`, hearth against sentence-transformers' `encode` on the same model, in the same run.

    .venv/bin/python bench/embed_bench.py [--count 64] [--device cpu]
    .venv/bin/python bench/embed_bench.py --compare   # needs `pip install -e ".[bench]"`

Prints the best of 3 wall times in ms per way of sending (`--compare`: inputs/s of a batch of 64
inputs of 128 tokens each, both sides, and their ratio; the vectors are checked to agree). The
loading thread is kept at one torch thread, as `hearth serve` keeps it: a second OpenMP team in
the process slows the engine thread's forwards several times on a small CPU.
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

from bench.machine import describe
from hearth.engine.config import ModelConfig
from hearth.engine.embedding.loader import build_embedding_engine
from hearth.engine.loading.loader import single_threaded
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import EmbeddingRequest
from tests.fixtures.embedding import build_tiny_bert, sample_texts


def build_minilm(out: Path) -> Path:
    """A MiniLM-sized random BERT (6 layers, hidden 384, mean pooling), built as the tests' one."""
    return build_tiny_bert(
        out, "mean", hidden=384, layers=6, heads=12, intermediate=1536, max_positions=512
    )


def texts_of(tokenizer: object, count: int, tokens: int) -> list[str]:
    """`count` distinct texts of exactly `tokens` tokens each (special tokens included)."""
    import random

    rng = random.Random(7)
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha()]  # type: ignore[attr-defined]
    texts = []
    for _ in range(count):
        words = [rng.choice(vocab) for _ in range(tokens)]
        while len(tokenizer(" ".join(words))["input_ids"]) > tokens:  # type: ignore[operator]
            words.pop()
        texts.append(" ".join(words))
    return texts


ST_SCRIPT = """
import json, sys, time
import numpy as np
import torch
from sentence_transformers import SentenceTransformer
folder, device, out = sys.argv[1:4]
texts = json.load(sys.stdin)
st = SentenceTransformer(folder, device=device)
options = dict(batch_size=len(texts), convert_to_numpy=True, normalize_embeddings=True)
run = lambda: st.encode(texts, **options)
np.save(out, run())  # warm-up, and the vectors
best = min(
    (lambda t0: (run(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3)
)
print(json.dumps({"seconds": best, "threads": torch.get_num_threads()}))
"""


def compare(folder: Path, engine: object, device: str, count: int, tokens: int) -> None:
    """hearth against sentence-transformers' encode, same model, same inputs, same run. The
    sentence-transformers side runs in its own process with torch's default threads (in this
    process a second OpenMP team would slow both sides)."""
    import json
    import os
    import subprocess

    import numpy as np
    from transformers import AutoTokenizer

    texts = texts_of(AutoTokenizer.from_pretrained(folder), count, tokens)

    def ours() -> np.ndarray:
        result = asyncio.run(engine.embed(EmbeddingRequest("b", texts)))  # type: ignore[attr-defined]
        return np.array(result.embeddings, dtype=np.float32)

    a = ours()  # warm-up, and the vectors
    hearth_s = min(_timed(ours) for _ in range(3))
    out = Path(tempfile.mkdtemp()) / "st.npy"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    done = subprocess.run(
        [sys.executable, "-c", ST_SCRIPT, str(folder), device, str(out)],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    st = json.loads(done.stdout.strip().splitlines()[-1])
    b = np.load(out)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    rates = {"hearth": count / hearth_s, "sentence-transformers": count / st["seconds"]}
    print(f"{count} inputs x {tokens} tokens; sentence-transformers: {st['threads']} torch threads")
    print("| engine | inputs/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    ratio = rates["hearth"] / rates["sentence-transformers"]
    print(f"hearth / sentence-transformers: {ratio:.2f}x; min cosine {cosine.min():.6f}")


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare", action="store_true", help="against sentence-transformers")
    parser.add_argument("--tokens", type=int, default=128, help="--compare: tokens per input")
    args = parser.parse_args()
    print(describe())
    single_threaded()
    folder = build_minilm(Path(tempfile.mkdtemp()))
    config = ModelConfig(id="minilm", source=str(folder), device=args.device, task="embed")
    engine = build_embedding_engine(config, resolve_source(str(folder)))
    if args.compare:
        compare(folder, engine, args.device, args.count, args.tokens)
        engine.shutdown()
        return
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
