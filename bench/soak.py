"""Soak test: mixed chat / completions / responses traffic with random client disconnects.

Starts its own `hearth serve` on a tiny random-weight model (or targets --base-url), sends
--requests requests at --concurrency, a --disconnect-rate share of them closed early at a random
point, and checks that every other one completes with usage equal to the tokens it received,
that afterwards nothing is running or waiting and every KV block is free, and that the server's
RSS grew by less than --max-rss-growth. Prints a table; exits 1 when a check fails.

    python bench/soak.py --requests 500 --concurrency 32 --disconnect-rate 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # bench.*; hearth comes installed

from bench.machine import describe  # noqa: E402
from hearth.server.metrics import LOAD_GAUGES, read_load_gauges  # noqa: E402

KINDS = ("chat", "completions", "responses")


@dataclass
class Outcome:
    kind: str
    stream: bool
    status: str  # ok, disconnected, error
    seconds: float
    tokens: int = 0
    detail: str = ""


@dataclass
class Report:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    rss_before_kb: int | None = None
    rss_after_kb: int | None = None
    gauges_after: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == "error"]

    @property
    def rss_growth(self) -> float | None:
        if not self.rss_before_kb or not self.rss_after_kb:
            return None
        return self.rss_after_kb / self.rss_before_kb - 1

    def failures(self, max_rss_growth: float) -> list[str]:
        found = [f"{o.kind} stream={o.stream}: {o.detail}" for o in self.errors]
        if any(self.gauges_after.values()):
            found.append(f"not idle afterwards: {self.gauges_after}")
        if self.rss_growth is not None and self.rss_growth >= max_rss_growth:
            found.append(f"RSS grew {self.rss_growth:.1%}")
        return found

    def table(self) -> str:
        rows = defaultdict(Counter)
        latency = defaultdict(list)
        for o in self.outcomes:
            key = f"{o.kind} {'stream' if o.stream else 'whole'}"
            rows[key][o.status] += 1
            rows[key]["tokens"] += o.tokens
            if o.status == "ok":
                latency[key].append(o.seconds)
        lines = [
            "| traffic | sent | ok | disconnected | errors | tokens | p50 s | max s |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key in sorted(rows):
            c, lat = rows[key], latency[key] or [0.0]
            sent = c["ok"] + c["disconnected"] + c["error"]
            lines.append(
                f"| {key} | {sent} | {c['ok']} | {c['disconnected']} | {c['error']} | "
                f"{c['tokens']} | {statistics.median(lat):.2f} | {max(lat):.2f} |"
            )
        total = Counter(o.status for o in self.outcomes)
        tokens = sum(o.tokens for o in self.outcomes)
        lines.append(
            f"| all | {len(self.outcomes)} | {total['ok']} | {total['disconnected']} | "
            f"{total['error']} | {tokens} | | |"
        )
        lines.append("")
        lines.append(f"wall {self.wall_s:.1f} s, {tokens / max(self.wall_s, 1e-9):.0f} tokens/s")
        if self.rss_before_kb and self.rss_after_kb:
            lines.append(
                f"server RSS {self.rss_before_kb / 1024:.1f} MiB -> "
                f"{self.rss_after_kb / 1024:.1f} MiB ({self.rss_growth:+.2%})"
            )
        lines.append(f"after: {self.gauges_after}")
        return "\n".join(lines)


# -- one request --------------------------------------------------------------------------------


def body_for(kind: str, model: str, stream: bool, max_tokens: int, i: int) -> tuple[str, dict]:
    text = f"soak request {i}: tell me something about the number {i}"
    if kind == "chat":
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "logprobs": True,  # one logprob entry per token: the tokens received
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/chat/completions", {**body, "stream": stream}
    if kind == "completions":
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "ignore_eos": True}
        body["logprobs"] = 0
        if stream:
            body["stream_options"] = {"include_usage": True}
        return "/completions", {**body, "stream": stream}
    return "/responses", {"model": model, "input": text, "max_output_tokens": max_tokens} | (
        {"stream": True} if stream else {}
    )


def count_tokens(kind: str, payload: dict) -> int:
    """Tokens carried by one response object or one stream event."""
    if kind == "chat":
        return sum(len((c.get("logprobs") or {}).get("content") or []) for c in payload["choices"])
    if kind == "completions":
        return sum(len((c.get("logprobs") or {}).get("tokens") or []) for c in payload["choices"])
    return 0


def check_usage(kind: str, usage: dict | None, received: int, max_tokens: int) -> str:
    if not usage:
        return "no usage"
    if kind == "responses":
        done = usage["output_tokens"]
        if usage["total_tokens"] != usage["input_tokens"] + done or not 0 < done <= max_tokens:
            return f"bad usage {usage}"
        return ""
    if usage["completion_tokens"] != received or received != max_tokens:
        return f"usage says {usage['completion_tokens']}, received {received} of {max_tokens}"
    if usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"bad usage {usage}"
    return ""


async def one(
    client: httpx.AsyncClient,
    kind: str,
    stream: bool,
    model: str,
    max_tokens: int,
    i: int,
    disconnect: bool,
    rng: random.Random,
) -> Outcome:
    path, body = body_for(kind, model, stream, max_tokens, i)
    started = time.perf_counter()

    def done(status: str, tokens: int = 0, detail: str = "") -> Outcome:
        return Outcome(kind, stream, status, time.perf_counter() - started, tokens, detail)

    try:
        if not stream:
            request = client.post(path, json=body)
            if disconnect:  # give up after a random share of the expected time
                try:
                    await asyncio.wait_for(request, rng.uniform(0.01, 0.5))
                except TimeoutError:
                    return done("disconnected")
                return done("disconnected", detail="finished before the disconnect")
            response = await request
            if response.status_code != 200:
                return done("error", detail=f"{response.status_code} {response.text[:200]}")
            data = response.json()
            if kind == "responses":
                usage, received = data["usage"], data["usage"]["output_tokens"]
            else:
                usage, received = data["usage"], count_tokens(kind, data)
            problem = check_usage(kind, usage, received, max_tokens)
            return done("error" if problem else "ok", received, problem)
        cut_after = rng.randint(1, max_tokens) if disconnect else None
        received, events, usage = 0, 0, None
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return done("error", detail=f"{response.status_code} {response.text[:200]}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[6:])
                events += 1
                if cut_after is not None and events >= cut_after:
                    return done("disconnected", received)  # closing the stream aborts it
                if "error" in payload and "type" not in payload:
                    return done("error", received, f"error event {payload['error']}")
                if kind == "responses":
                    if payload["type"] in ("response.completed", "response.incomplete"):
                        usage = payload["response"]["usage"]
                        received = usage["output_tokens"]
                    elif payload["type"] == "response.failed":
                        return done("error", received, str(payload["response"]["error"]))
                else:
                    received += count_tokens(kind, payload)
                    usage = payload.get("usage") or usage
        problem = check_usage(kind, usage, received, max_tokens)
        return done("error" if problem else "ok", received, problem)
    except httpx.HTTPError as exc:
        return done("error", detail=f"{type(exc).__name__}: {exc}")


# -- the run ------------------------------------------------------------------------------------


def rss_kb(pid: int | None) -> int | None:
    if pid is None:
        return None
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


async def gauges(client: httpx.AsyncClient, root: str, model: str) -> dict[str, float]:
    found = read_load_gauges((await client.get(f"{root}/metrics")).text, model)
    return {name: found.get(name, float("nan")) for name in LOAD_GAUGES}


async def wait_idle(client: httpx.AsyncClient, root: str, model: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        values = await gauges(client, root, model)
        if not any(values.values()) or time.monotonic() > deadline:
            return values
        await asyncio.sleep(0.2)


async def soak(
    base_url: str,
    model: str,
    requests: int,
    concurrency: int,
    disconnect_rate: float,
    max_tokens: int = 24,
    pid: int | None = None,
    seed: int = 0,
    warmup: int = 32,
) -> Report:
    """Run the soak against a live server (base_url ends in /v1); `pid` for its RSS."""
    rng = random.Random(seed)
    root = base_url.removesuffix("/v1")
    report = Report()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        plan = [
            (rng.choice(KINDS), rng.random() < 0.5, rng.random() < disconnect_rate)
            for _ in range(warmup + requests)
        ]
        gate = asyncio.Semaphore(concurrency)

        async def run(i: int) -> Outcome:
            kind, stream, disconnect = plan[i]
            async with gate:
                return await one(client, kind, stream, model, max_tokens, i, disconnect, rng)

        await asyncio.gather(*(run(i) for i in range(warmup)))  # allocator and caches settle
        await wait_idle(client, root, model)
        report.rss_before_kb = rss_kb(pid)
        started = time.perf_counter()
        report.outcomes = await asyncio.gather(*(run(i) for i in range(warmup, warmup + requests)))
        report.wall_s = time.perf_counter() - started
        report.gauges_after = await wait_idle(client, root, model)
        report.rss_after_kb = rss_kb(pid)
    return report


def tiny_checkpoint(out: Path) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer (as the test suite builds it)."""
    sys.path.append(str(ROOT))  # bench.*; hearth comes installed
    from transformers import AutoTokenizer

    from hearth.engine.loading.sources import resolve_source
    from tests.fixtures.server import DEFAULT_GGUF, build_tiny_checkpoint

    source = resolve_source(DEFAULT_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source.gguf_dir, gguf_file=source.gguf_name)
    tokenizer.save_pretrained(out / "tokenizer")
    return build_tiny_checkpoint(out / "tiny", out / "tokenizer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--disconnect-rate", type=float, default=0.2)
    parser.add_argument("--max-tokens", type=int, default=24, help="per request")
    parser.add_argument("--base-url", help="a running server's /v1 URL (default: start one)")
    parser.add_argument("--model", default="tiny", help="model id (with --base-url)")
    parser.add_argument("--pid", type=int, help="the server's pid for RSS (with --base-url)")
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(describe(), flush=True)  # the machine every figure below was measured on
    with ExitStack() as stack:
        base_url, model, pid = args.base_url, args.model, args.pid
        if base_url is None:
            sys.path.append(str(ROOT))  # bench.*; hearth comes installed
            from tests.fixtures.server import running_server

            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            checkpoint = tiny_checkpoint(tmp)
            base_url, proc = stack.enter_context(
                running_server("--model", str(checkpoint), log_path=tmp / "server.log")
            )
            model, pid = checkpoint.name, proc.pid
        report = asyncio.run(
            soak(
                base_url,
                model,
                args.requests,
                args.concurrency,
                args.disconnect_rate,
                args.max_tokens,
                pid,
                args.seed,
            )
        )
    print(
        f"soak: {args.requests} requests @ {args.concurrency}, "
        f"disconnect rate {args.disconnect_rate:.0%}, max_tokens {args.max_tokens}\n"
    )
    print(report.table())
    failures = report.failures(args.max_rss_growth)
    for failure in failures[:20]:
        print("FAIL:", failure)
    print("PASS" if not failures else f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
