"""Interactive latency while a large batch runs: TTFT p50 of a steady stream of streamed chats
(one every --interval seconds, open loop) with no batch running, then while a batch of
--batch-lines chat lines runs (Batch API, `--batch-max-in-flight` lines in the engine), on the
default model (SmolLM2-135M GGUF). Two servers, back to back in one run: priorities on (batch
lines at priority 100, live requests at 0) and priorities off (`--batch-priority 0`: batch lines
compete as equals, the FCFS scheduler of before). Each row's ratio compares its own server's
two phases, interleaved over --rounds (each round: the stream alone, then with a fresh batch),
so a change in the machine's load between or during servers hits both conditions.

    python bench/batch_priority_bench.py --rounds 3 --requests 10 --batch-lines 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*; hearth comes installed

from bench.machine import describe  # noqa: E402

TOPICS = ["a dragon who bakes bread", "a lighthouse keeper", "a robot gardener", "a lost cat"]


@dataclass
class Row:
    name: str
    alone: list[float]
    with_batch: list[float]
    lines_done: int  # batch lines answered while the interactive streams ran

    @property
    def ratio(self) -> float:
        return statistics.median(self.with_batch) / statistics.median(self.alone)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def ttft(client: httpx.AsyncClient, model: str, topic: str, max_tokens: int) -> float:
    """Seconds to the first streamed token of one chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a short story about {topic}."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    start = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        first = None
        async for line in reply.aiter_lines():
            if first is None and line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
    assert first is not None, "no token streamed"
    return first


async def stream(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> list[float]:
    """--requests chats started every --interval seconds (not waiting for each other)."""
    tasks = []
    for i in range(args.requests):
        topic = TOPICS[i % len(TOPICS)]
        tasks.append(asyncio.create_task(ttft(client, model, topic, args.max_tokens)))
        await asyncio.sleep(args.interval)
    return list(await asyncio.gather(*tasks))


async def submit_batch(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> str:
    lines = [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [
                    {"role": "user", "content": f"Summarize the story of {TOPICS[i % 4]}."}
                ],
                "max_tokens": args.batch_tokens,
                "ignore_eos": True,
            },
        }
        for i in range(args.batch_lines)
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = await client.post(
        "/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": "batch"}
    )
    upload.raise_for_status()
    body = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    batch = await client.post("/v1/batches", json=body)
    batch.raise_for_status()
    return batch.json()["id"]


async def lines_done(client: httpx.AsyncClient, batch_id: str) -> int:
    batch = (await client.get(f"/v1/batches/{batch_id}")).json()
    return batch["request_counts"]["completed"]


async def measure(name: str, base: str, args: argparse.Namespace) -> Row:
    """--rounds of (the stream alone, then the stream while a fresh batch runs): the two
    conditions interleaved, so a change in the machine's load hits both."""
    row = Row(name, [], [], 0)
    async with httpx.AsyncClient(base_url=base, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        for topic in TOPICS:  # warm up: first steps, caches
            await ttft(client, model, topic, args.max_tokens)
        for _ in range(args.rounds):
            row.alone += await stream(client, model, args)
            batch_id = await submit_batch(client, model, args)
            while await lines_done(client, batch_id) < args.batch_max_in_flight:  # in full swing
                await asyncio.sleep(0.2)
            before = await lines_done(client, batch_id)
            row.with_batch += await stream(client, model, args)
            done = await lines_done(client, batch_id) - before
            assert done < args.batch_lines - before, "the batch ended early: more --batch-lines"
            row.lines_done += done
            await client.post(f"/v1/batches/{batch_id}/cancel")
            while (await client.get(f"/v1/batches/{batch_id}")).json()["status"] != "cancelled":
                await asyncio.sleep(0.2)
    return row


def serve(port: int, files: str, batch_priority: int, args: argparse.Namespace) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "hearth", "serve", "--port", str(port), "--files-dir", files,
        "--batch-priority", str(batch_priority),
        "--batch-max-in-flight", str(args.batch_max_in_flight),
    ]  # fmt: skip
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10, help="interactive chats per phase")
    parser.add_argument("--rounds", type=int, default=3, help="alone / with batch phases, each")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between them")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per interactive chat")
    parser.add_argument("--batch-lines", type=int, default=300)
    parser.add_argument("--batch-tokens", type=int, default=64, help="tokens per batch line")
    parser.add_argument("--batch-max-in-flight", type=int, default=8)
    args = parser.parse_args()
    rows = []
    for name, priority in (("priorities on (batch 100)", 100), ("priorities off (all 0)", 0)):
        port = free_port()
        with tempfile.TemporaryDirectory() as files:
            proc = serve(port, files, priority, args)
            try:
                wait_ready(f"http://127.0.0.1:{port}", proc)
                rows.append(asyncio.run(measure(name, f"http://127.0.0.1:{port}", args)))
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    print(describe())
    print(
        f"{args.rounds} x {args.requests} streamed chats per phase, one every {args.interval:g} s, "
        f"{args.max_tokens} tokens"
        f"; batch: {args.batch_lines} lines x {args.batch_tokens} tokens, "
        f"{args.batch_max_in_flight} in flight; threads {os.cpu_count()}"
    )
    print(
        f"| {'server':<26} | TTFT p50 alone | TTFT p50 with batch | ratio | p90 alone "
        "| p90 with batch | batch lines done |"
    )
    print(f"| {'-' * 26} | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        alone, busy = statistics.median(row.alone) * 1000, statistics.median(row.with_batch) * 1000
        p90 = [statistics.quantiles(x, n=10)[-1] * 1000 for x in (row.alone, row.with_batch)]
        print(
            f"| {row.name:<26} | {alone:.1f} ms | {busy:.1f} ms | {row.ratio:.2f} "
            f"| {p90[0]:.1f} ms | {p90[1]:.1f} ms | {row.lines_done} |"
        )


if __name__ == "__main__":
    main()
