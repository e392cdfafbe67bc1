"""A live tiny-model server under saturation, oversized bodies, API keys and SIGTERM drains."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.server import running_server, tiny_config
from tests.live.test_api import gauges, wait_idle

KEY = "sk-hearth-secret-4f9a2c"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"model": "tiny", "prompt": "go", "max_tokens": 300, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path):
    tmp = tmp_path_factory.mktemp("live")
    config = tiny_config(tmp / "models.yaml", tiny_llama_dir, max_num_seqs=16, max_waiting=16)
    log = tmp / "server.log"
    args = ("--config", str(config), "--api-key", KEY, "--log-level", "debug")
    with running_server(*args, log_path=log) as (base_url, proc):
        yield base_url, proc, log


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def test_health_stays_fast_while_saturated_and_overflow_is_429(live) -> None:
    base_url, _, _ = live
    root = base_url.removesuffix("/v1")

    async def main() -> tuple[list[float], list[httpx.Response], int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(headers=AUTH, timeout=60, limits=limits) as client:
            holders = []

            async def hold() -> None:  # a long stream that reads slowly to the end
                async with client.stream("POST", f"{base_url}/completions", json=LONG) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_lines():
                        pass

            holders = [asyncio.create_task(hold()) for _ in range(32)]  # 16 running, 16 waiting
            while gauges(base_url, "tiny")["hearth_requests_waiting"] < 16:
                await asyncio.sleep(0.05)
            overflow = {**LONG, "stream": False, "max_tokens": 1}
            over = await asyncio.gather(
                *(client.post(f"{base_url}/completions", json=overflow) for _ in range(8))
            )
            latencies = []
            for _ in range(200):
                started = time.perf_counter()
                response = await client.get(f"{root}/health")
                latencies.append(time.perf_counter() - started)
                assert response.status_code == 200
            still_busy = sum(not t.done() for t in holders)
            for task in holders:  # the clients go away: their requests are aborted
                task.cancel()
            await asyncio.gather(*holders, return_exceptions=True)
            return latencies, over, still_busy

    latencies, over, still_busy = asyncio.run(main())
    assert still_busy >= 16  # the engine was saturated for the whole measurement
    for response in over:
        assert response.status_code == 429, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
    p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
    print(f"/health under saturation: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.2
    assert wait_idle(base_url, "tiny") == dict.fromkeys(wait_idle(base_url, "tiny"), 0.0)


def test_ten_megabytes_get_413_fast_and_do_not_stall_a_small_stream(live) -> None:
    base_url, _, _ = live
    arrivals: list[float] = []
    last: list[str] = []

    def small() -> None:
        body = LONG
        with httpx.stream(
            "POST", f"{base_url}/completions", json=body, headers=AUTH, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.perf_counter())
                    last.append(line)

    thread = threading.Thread(target=small)
    thread.start()
    while len(arrivals) < 5:
        time.sleep(0.01)
    huge = json.dumps({"model": "tiny", "prompt": "x" * 10 * 2**20}).encode()
    started = time.perf_counter()
    response = httpx.post(
        f"{base_url}/completions",
        content=huge,
        headers={**AUTH, "content-type": "application/json"},
        timeout=30,
    )
    elapsed = time.perf_counter() - started
    thread.join()
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    gap = max(b - a for a, b in itertools.pairwise(arrivals))
    print(f"10 MiB body: 413 in {elapsed * 1000:.0f} ms; small stream max gap {gap * 1000:.0f} ms")
    assert elapsed < 2 and gap < 1.0 and last[-1] == "data: [DONE]"


def test_model_id_paths_are_404(live) -> None:
    base_url, _, _ = live
    body = {"model": "../../etc/passwd", "prompt": "x", "max_tokens": 1}
    response = httpx.post(f"{base_url}/completions", json=body, headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{base_url}/models/..%2F..%2Fetc%2Fpasswd", headers=AUTH).status_code == 404


def test_api_keys_are_never_logged(live) -> None:
    base_url, _, log = live
    wrong = {"Authorization": f"Bearer {KEY}-wrong"}
    assert httpx.get(f"{base_url}/models", headers=wrong).status_code == 401
    assert httpx.get(f"{base_url}/models", headers=AUTH).status_code == 200
    time.sleep(0.3)
    text = log.read_text()
    assert "GET /v1/models" in text  # debug access logging was on
    assert KEY not in text and KEY[3:] not in text


def stream_until_end(base_url: str, body: dict, events: list[str]) -> None:
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))


def sigterm_while_streaming(
    tiny_llama_dir: Path, drain_timeout: str, streams: int
) -> tuple[list[list[str]], list[int], int, float]:
    """SIGTERM a server with `streams` long streams in flight; returns their events, the
    statuses of requests made while draining, the exit code and the seconds to exit."""
    args = ("--model", str(tiny_llama_dir), "--drain-timeout", drain_timeout)
    with running_server(*args) as (base_url, proc):
        body = {**LONG, "model": tiny_llama_dir.name}
        events: list[list[str]] = [[] for _ in range(streams)]
        threads = [
            threading.Thread(target=stream_until_end, args=(base_url, body, e)) for e in events
        ]
        for thread in threads:
            thread.start()
        while not all(events):
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        started = time.perf_counter()
        time.sleep(0.1)
        root = base_url.removesuffix("/v1")
        statuses = [
            httpx.get(f"{root}/health").status_code,
            httpx.post(f"{base_url}/completions", json={**body, "stream": False}).status_code,
        ]
        for thread in threads:
            thread.join(60)
        code = proc.wait(60)
        return events, statuses, code, time.perf_counter() - started


def test_sigterm_drains_in_flight_requests_then_exits_0(tiny_llama_dir: Path) -> None:
    events, statuses, code, _ = sigterm_while_streaming(tiny_llama_dir, "30", 1)
    assert statuses == [503, 503] and code == 0
    [stream] = events
    assert stream[-1] == "[DONE]"
    assert json.loads(stream[-2])["choices"][0]["finish_reason"] == "length"
    assert sum(len(json.loads(e)["choices"][0]["text"]) > 0 for e in stream[:-1]) > 100


def test_sigterm_past_the_drain_timeout_ends_requests_with_an_error(tiny_llama_dir: Path) -> None:
    events, statuses, code, seconds = sigterm_while_streaming(tiny_llama_dir, "0.5", 16)
    assert statuses == [503, 503] and code == 0 and seconds < 15
    for stream in events:
        assert stream[-1] == "[DONE]"
        error = json.loads(stream[-2])["error"]
        assert "shutting down" in error["message"]
