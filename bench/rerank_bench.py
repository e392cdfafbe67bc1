"""Rerank throughput: 1 query x 100 documents on a MiniLM-sized random BERT cross-encoder (6 layers,
hidden 384, like cross-encoder/ms-marco-MiniLM-L6-v2) built here, hearth's rerank engine against
sentence-transformers' CrossEncoder.predict on the same model and pairs, in the same run.

    .venv/bin/python bench/rerank_bench.py [--documents 100] [--device cpu]

Needs sentence-transformers (the `test` or `bench` extra). The CrossEncoder side runs in its own
process with torch's default threads and `predict`'s default batch size (32) unless
`--st-batch-size` says otherwise, as bench/embed_bench.py --compare does for embeddings; the two
sides take turns (`--rounds`, default 5), so both see the same load on a shared machine. Prints
the best wall time of each as documents/s, their ratio and the largest score difference.
Documents run from 16 to 400 tokens (seeded), the query is 13 words.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.embed_bench import _timed, texts_of
from bench.machine import describe
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import single_threaded
from hearth.engine.loading.sources import resolve_source
from hearth.engine.rerank.loader import build_rerank_engine
from hearth.engine.types import RerankRequest
from tests.fixtures.rerank import build_tiny_cross_encoder

ST_SCRIPT = """
import json, sys, time
import torch
from sentence_transformers import CrossEncoder
folder, device, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
pairs = json.loads(sys.stdin.readline())
model = CrossEncoder(folder, device=device)
run = lambda: model.predict(pairs, batch_size=batch_size, show_progress_bar=False)
scores = [float(s) for s in run()]  # warm-up, and the scores
print(json.dumps({"threads": torch.get_num_threads(), "scores": scores}), flush=True)
for _ in sys.stdin:  # one timed run per line
    start = time.perf_counter()
    run()
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)
"""


def build_minilm_cross_encoder(out: Path) -> Path:
    """A MiniLM-sized random BERT cross-encoder, built as the tests' tiny one."""
    return build_tiny_cross_encoder(
        out, hidden=384, layers=6, heads=12, intermediate=1536, max_positions=512
    )


def load_as_the_server_does(config: ModelConfig) -> Any:
    """The engine loaded on a thread of its own kept at one torch thread, as `hearth serve`'s
    ModelLoader does; this (the event loop's) thread keeps torch's default. Measured on a loaded
    2-vCPU EPYC: with this thread at one torch thread instead, the engine thread's forwards took
    about 3x the time (docs/benchmarks.md)."""
    loaded: list[Any] = []

    def load() -> None:
        single_threaded()
        loaded.append(build_rerank_engine(config, resolve_source(config.source)))

    loader = threading.Thread(target=load, name="loader")
    loader.start()
    loader.join()
    return loaded[0]


def documents_of(tokenizer: object, count: int) -> list[str]:
    """`count` documents of 16 to 400 tokens, spread evenly (seeded)."""
    lengths = [16 + (i * 97) % 385 for i in range(count)]
    pool = texts_of(tokenizer, count, 400)
    out = []
    for text, length in zip(pool, lengths, strict=True):
        words = text.split()
        while len(tokenizer(" ".join(words))["input_ids"]) > length:  # type: ignore[operator]
            words = words[: max(1, len(words) * 9 // 10)]
        out.append(" ".join(words))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--st-batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each, alternated")
    args = parser.parse_args()
    print(describe())
    folder = build_minilm_cross_encoder(Path(tempfile.mkdtemp()))
    config = ModelConfig(id="minilm-ce", source=str(folder), device=args.device, task="rerank")
    engine = load_as_the_server_does(config)
    query = "which passage says how the hearth fire model embeds a search query for documents"
    pairs = [(query, d) for d in documents_of(engine.tokenizer, args.documents)]

    def ours() -> list[float]:
        return asyncio.run(engine.rerank(RerankRequest("b", pairs))).scores

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    st_side = subprocess.Popen(
        [sys.executable, "-c", ST_SCRIPT, str(folder), args.device, str(args.st_batch_size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert st_side.stdin is not None and st_side.stdout is not None
    st_side.stdin.write(json.dumps([list(p) for p in pairs]) + "\n")
    st_side.stdin.flush()
    st = json.loads(st_side.stdout.readline())
    hearth_scores = ours()  # warm-up, and the scores
    tokens = asyncio.run(engine.rerank(RerankRequest("t", pairs))).prompt_tokens
    hearth_times, st_times = [], []
    for _ in range(args.rounds):  # alternated, so both sides see the same machine load
        hearth_times.append(_timed(ours))
        st_side.stdin.write("run\n")
        st_side.stdin.flush()
        st_times.append(json.loads(st_side.stdout.readline())["seconds"])
    st_side.stdin.close()
    st_side.wait()
    engine.shutdown()
    hearth_s, st["seconds"] = min(hearth_times), min(st_times)
    diff = max(abs(a - b) for a, b in zip(hearth_scores, st["scores"], strict=True))
    rates = {"hearth": len(pairs) / hearth_s, "sentence-transformers": len(pairs) / st["seconds"]}
    print(
        f"1 query x {len(pairs)} documents, {tokens} tokens in all; sentence-transformers: "
        f"{st['threads']} torch threads, batch size {args.st_batch_size}"
    )
    print("| engine | documents/s | ms per request |\n|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {len(pairs) / rate * 1000:.0f} |")
    rounds = ", ".join(f"{h:.1f}/{t:.1f}" for h, t in zip(hearth_times, st_times, strict=True))
    print(f"rounds, s (hearth/sentence-transformers): {rounds}")
    ratio = rates["hearth"] / rates["sentence-transformers"]
    print(f"hearth / sentence-transformers: {ratio:.2f}x; largest score difference {diff:.2e}")


if __name__ == "__main__":
    main()
