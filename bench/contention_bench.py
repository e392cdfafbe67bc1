"""Decode speed on a busy machine: hearth (threads follow free cores) against hearth with a fixed
team (today's behaviour, HEARTH_THREAD_CONTROL=off), hearth at one thread and llama.cpp, on a
quiet machine and with one and two busy-looping processes that the bench starts itself.

    .venv/bin/python bench/contention_bench.py --llama-python /tmp/llama-venv/bin/python
    .venv/bin/python bench/contention_bench.py --part multi   # two CPU models + an embedding one

`--part single` (default): per machine load (0, 1, 2 busy processes, each a `while True` loop
bounded by `--busy-limit` seconds and ended by the bench after its phase), one streamed request
of `--tokens` new tokens (decode tok/s: (n - 1) tokens over first-to-last token time), then
`--streams` concurrent requests (total tok/s over the wall time), and on the quiet machine
`--wide` concurrent requests too. Every run stops at `--limit` seconds (the rate is that of the
tokens produced so far): a fixed team under load runs at ~1 tok/s. One engine is alive at a
time (a second OpenMP team in the process would change the first's behaviour); each variant's
engine goes through the loads in order, as a server would meet them. llama.cpp
(llama-cpp-python) runs in a worker under `--llama-python` with `--threads` threads; its
repacked (extra) buffers can crash on some CPUs, then the worker is restarted with
use_extra_bufts=False and the table says which mode ran. llama-cpp-python serves one sequence
at a time: its concurrent row runs the requests one after another.

OMP_WAIT_POLICY (read when torch loads) is printed with the table: run the bench under
OMP_WAIT_POLICY=passive / active to compare libgomp's sleeping and spinning waits.

`--part multi`: one process serving the default model twice (models a and b) and a MiniLM-sized
embedding model, all busy at once (one stream each on a and b, embedding requests of 16 texts in
a loop), against the same two streams on model a alone; with the controller and without.

Numbers from a shared machine are noisy: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.llama_cpp_bench import DEFAULT_SOURCE, PROMPT

BUSY = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"
VARIANTS = {  # name -> environment for the engine's build
    "hearth (threads follow free cores)": {"HEARTH_THREAD_CONTROL": "on"},
    "hearth fixed team (today)": {"HEARTH_THREAD_CONTROL": "off"},
    "hearth 1 thread": {"HEARTH_THREAD_CONTROL": "off", "HEARTH_NUM_THREADS": "1"},
}
SHORT = dict(zip(("follow", "fixed", "one"), VARIANTS, strict=True))  # --variants names


def hearth_model(source: str, autotune: str):
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import load_model
    from hearth.engine.loading.sources import resolve_source

    config = ModelConfig(id="hearth", source=source, engine={"autotune": autotune})
    return load_model(config, resolve_source(source))


def busy(count: int, limit: float) -> list[subprocess.Popen]:
    """`count` processes that each keep one core busy for at most `limit` seconds."""
    code = BUSY.format(limit=limit)
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


# -- llama.cpp worker -------------------------------------------------------------------------
def llama_worker(model_path: str, threads: int, extra: bool) -> None:
    """stdin: {"tokens", "n", "limit"} per line; stdout: {"times", "ids"} per line."""
    import llama_cpp

    if not extra:  # no Llama() argument for it (0.3.36): the model parameters' default
        defaults = llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = without_extra_bufts
    llm = llama_cpp.Llama(model_path, n_threads=threads, n_ctx=2048, verbose=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        llm.reset()
        start, stamps = time.perf_counter(), []
        for _ in llm.generate(req["tokens"], top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter() - start)
            if len(stamps) == req["n"] or stamps[-1] > req["limit"]:
                break
        print(json.dumps({"times": stamps}), flush=True)


class Llama:
    def __init__(self, python: str, model_path: str, threads: int) -> None:
        self.mode = "default buffers"
        self.args = [python, __file__, "--worker", model_path, "--threads", str(threads)]
        self.tokens: list[int] = []
        self.proc = self._start([])
        if self.proc is None or not self._probe():
            self.mode = "use_extra_bufts=False (default buffers crashed)"
            self.proc = self._start(["--no-extra"])
            if self.proc is None:
                raise RuntimeError("the llama.cpp worker did not start")

    def _start(self, extra: list[str]) -> subprocess.Popen | None:
        proc = subprocess.Popen(
            self.args + extra, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        line = proc.stdout.readline()
        return proc if line and json.loads(line).get("ready") else None

    def _probe(self) -> bool:
        try:
            self.run([1, 2, 3], 4, 60)
            return True
        except (BrokenPipeError, json.JSONDecodeError, ValueError):
            return False

    def run(self, tokens: list[int], n: int, limit: float) -> list[float]:
        self.proc.stdin.write(json.dumps({"tokens": tokens, "n": n, "limit": limit}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# -- hearth -----------------------------------------------------------------------------------
async def stream(engine, tokens: list[int], n: int, limit: float, rid: str) -> list[float]:
    """Token arrival times (s from the start) of one greedy request, cut at `limit` seconds."""
    from hearth.engine.types import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    start, stamps = time.perf_counter(), []
    gen = engine.generate(GenerationRequest(rid, tokens, params))
    try:
        async for out in gen:
            stamps += [time.perf_counter() - start] * len(out.token_ids)
            if stamps and stamps[-1] > limit:
                break
    finally:
        await gen.aclose()
    return stamps


def decode_rate(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def hearth_runs(engine, tokens, args, wide: bool) -> dict[str, float]:
    async def many(count: int) -> float:
        start = time.perf_counter()
        runs = [stream(engine, tokens, args.tokens, args.limit, f"c{i}") for i in range(count)]
        done = await asyncio.gather(*runs)
        return sum(len(t) for t in done) / (time.perf_counter() - start)

    asyncio.run(stream(engine, tokens, 4, args.limit, "warm"))
    out = {"single": decode_rate(asyncio.run(stream(engine, tokens, args.tokens, args.limit, "s")))}
    out[f"x{args.streams}"] = asyncio.run(many(args.streams))
    if wide:
        out[f"x{args.wide}"] = asyncio.run(many(args.wide))
    out["threads"] = engine.stats().cpu_threads or float(engine.threads)
    return out


def llama_runs(llama: Llama, tokens, args, wide: bool) -> dict[str, float]:
    llama.run(tokens, 4, args.limit)
    out = {"single": decode_rate(llama.run(tokens, args.tokens, args.limit))}
    for count in [args.streams] + ([args.wide] if wide else []):
        start, total = time.perf_counter(), 0
        for _ in range(count):
            total += len(llama.run(tokens, args.tokens, args.limit / count))
        out[f"x{count}"] = total / (time.perf_counter() - start)
    return out


def part_single(args) -> None:
    from bench.machine import describe
    from hearth.engine.builder import build_engine
    from hearth.engine.loading.sources import resolve_source
    from hearth.engine.text.tokenizer import ChatTokenizer

    loaded = hearth_model(args.source, args.autotune)
    tokens = ChatTokenizer(loaded.tokenizer, None).encode_chat(
        [{"role": "user", "content": PROMPT}]
    )
    results: dict[tuple[str, int], dict[str, float]] = {}
    loads = [int(x) for x in args.loads.split(",")]
    for name in [SHORT[v] for v in args.variants.split(",")]:
        env = VARIANTS[name]
        os.environ.pop("HEARTH_NUM_THREADS", None)
        os.environ.update(env)
        engine = build_engine(loaded)
        try:
            for load in loads:
                procs = busy(load, args.busy_limit)
                time.sleep(1.0)
                try:
                    results[(name, load)] = hearth_runs(engine, tokens, args, load == 0)
                finally:
                    stop(procs)
                print(name, load, results[(name, load)], flush=True)
        finally:
            engine.shutdown()
    if args.llama_python:
        path = resolve_source(args.source).location
        llama = Llama(args.llama_python, str(path), args.threads)
        name = f"llama.cpp {args.threads} threads ({llama.mode})"
        for load in loads:
            procs = busy(load, args.busy_limit)
            time.sleep(1.0)
            try:
                results[(name, load)] = llama_runs(llama, tokens, args, load == 0)
            finally:
                stop(procs)
            print(name, load, results[(name, load)], flush=True)
        llama.close()
    print()
    print(describe())
    print(
        f"{args.source}; prompt {len(tokens)} tokens, {args.tokens} new, greedy; each run cut at "
        f"{args.limit:.0f} s; autotune {args.autotune}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
        "noisy shared machine: compare rows of this run only"
    )
    cols = ["single", f"x{args.streams}", f"x{args.wide}"]
    print(
        f"| engine | busy processes | single tok/s | x{args.streams} tok/s | x{args.wide} tok/s "
        "| threads at end |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for (name, load), r in results.items():
        cells = " | ".join(f"{r[c]:.1f}" if c in r else "-" for c in cols)
        threads = f"{r['threads']:.0f}" if "threads" in r else "-"
        print(f"| {name} | {load} | {cells} | {threads} |")
    quiet_one = results.get(("hearth 1 thread", 0), {}).get("single")
    for (name, load), r in results.items():
        if quiet_one and name.startswith("hearth (") and load:
            print(
                f"{name}, {load} busy: single stream {r['single'] / quiet_one:.2f}x hearth's "
                "1-thread quiet figure"
            )


def part_multi(args) -> None:
    from bench.embed_bench import build_minilm
    from bench.machine import describe
    from hearth.engine.builder import build_engine
    from hearth.engine.config import ModelConfig
    from hearth.engine.embedding.loader import build_embedding_engine
    from hearth.engine.loading.sources import resolve_source
    from hearth.engine.text.tokenizer import ChatTokenizer
    from hearth.engine.types import EmbeddingRequest
    from tests.fixtures.embedding import sample_texts

    folder = build_minilm(Path(tempfile.mkdtemp()))
    texts = sample_texts(16)
    rows = []
    for name, env in list(VARIANTS.items())[:2]:
        os.environ.pop("HEARTH_NUM_THREADS", None)
        os.environ.update(env)
        a, b = hearth_model(args.source, args.autotune), hearth_model(args.source, args.autotune)
        tokens = ChatTokenizer(a.tokenizer, None).encode_chat([{"role": "user", "content": PROMPT}])
        ea = build_engine(a)
        eb = build_engine(b)
        config = ModelConfig(id="minilm", source=str(folder), task="embed")
        emb = build_embedding_engine(config, resolve_source(str(folder)))

        async def embed_loop(stop_at: list[bool], emb=emb) -> tuple[int, float]:
            start, done = time.perf_counter(), 0
            while not stop_at[0]:
                await emb.embed(EmbeddingRequest(f"e{done}", texts))
                done += 1
            return done * len(texts), time.perf_counter() - start

        async def scenario(streams: list, embed: bool, tokens=tokens) -> dict[str, float]:
            flag = [False]
            loop_task = asyncio.create_task(embed_loop(flag)) if embed else None
            runs = await asyncio.gather(
                *(
                    stream(e, tokens, args.tokens, args.limit, f"m{i}")
                    for i, e in enumerate(streams)
                )
            )
            flag[0] = True
            out = {f"stream {i} tok/s": decode_rate(t) for i, t in enumerate(runs)}
            out["slowest request s"] = max(t[-1] for t in runs)
            if loop_task is not None:
                count, seconds = await loop_task
                out["embed inputs/s"] = count / seconds
            return out

        try:
            asyncio.run(scenario([ea], False))  # warm-up
            asyncio.run(scenario([eb], True))
            one = asyncio.run(scenario([ea, ea], False))
            rows.append((name, "2 streams on model a alone", one))
            both = asyncio.run(scenario([ea, eb], True))
            threads = [e.stats().cpu_threads for e in (ea, eb, emb)]
            rows.append((name, f"a + b + embedding all busy (threads at end {threads})", both))
            print(rows[-2:], flush=True)
        finally:
            for e in (ea, eb, emb):
                e.shutdown()
    print()
    print(describe())
    print(f"{args.source} twice + MiniLM-sized embedding; {args.tokens} new tokens per stream")
    print("| engine | scenario | stream 0 tok/s | stream 1 tok/s | slowest request s ", end="")
    print("| embed inputs/s |")
    print("|---|---|---:|---:|---:|---:|")
    for name, what, r in rows:
        cells = [
            r.get(k)
            for k in ("stream 0 tok/s", "stream 1 tok/s", "slowest request s", "embed inputs/s")
        ]
        text = " | ".join("-" if c is None else f"{c:.1f}" for c in cells)
        print(f"| {name} | {what} | {text} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["single", "multi"], default="single")
    parser.add_argument("--source", default=DEFAULT_SOURCE)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--wide", type=int, default=32)
    parser.add_argument("--loads", default="0,1,2", help="busy processes per phase")
    parser.add_argument("--autotune", default="auto", help="engine autotune: auto, off")
    parser.add_argument("--variants", default="follow,fixed,one", help="of " + ",".join(SHORT))
    parser.add_argument("--limit", type=float, default=30.0, help="seconds per run at most")
    parser.add_argument("--busy-limit", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--llama-python", help="a Python with llama-cpp-python installed")
    parser.add_argument("--verbose", action="store_true", help="the controller's changes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-extra", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return llama_worker(args.worker, args.threads, not args.no_extra)
    os.environ.setdefault("HEARTH_CACHE_DIR", str(Path.cwd() / ".cache-hearth"))
    if args.verbose:
        import logging

        logging.basicConfig(format="%(asctime)s %(message)s")
        logging.getLogger("hearth.engine").setLevel(logging.DEBUG)
    from hearth.engine.loading.loader import single_threaded

    single_threaded()  # as hearth serve's loader: only the engine threads run multi-threaded
    part_single(args) if args.part == "single" else part_multi(args)


if __name__ == "__main__":
    main()
