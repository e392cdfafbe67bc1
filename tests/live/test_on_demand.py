"""Models loaded on demand, against the real server (server/model_manager.py, hearth/on_demand.py):
three tiny models under a budget that holds two, keep_alive giving host memory back, ten first
requests sharing one load, and the one-model default unchanged."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from bench.soak import rss_kb
from hearth.engine.config import ModelConfig
from hearth.engine.loading.sources import resolve_source
from hearth.on_demand import estimate_bytes
from tests.fixtures.server import DEFAULT_GGUF, running_server, tiny_config

ENGINE = {"kv_cache_memory": "32MiB", "autotune": "off"}
CHAT = [{"role": "user", "content": "Hello there"}]
pytestmark = pytest.mark.slow


def model(model_id: str, checkpoint: Path, **keys: object) -> dict:
    engine = {**ENGINE, **keys.pop("engine", {})}  # type: ignore[dict-item]
    return {"id": model_id, "source": str(checkpoint), "device": "cpu", "engine": engine, **keys}


def write_config(path: Path, models: list[dict], **top: object) -> Path:
    path.write_text(json.dumps({"models": models, **top}))
    return path


def states(base: str) -> dict[str, str]:
    return {m["id"]: m["state"] for m in httpx.get(f"{base}/models").json()["data"]}


def gauge(base: str, name: str, model_id: str) -> float:
    page = httpx.get(base.removesuffix("/v1") + "/metrics").text
    line = next(x for x in page.splitlines() if x.startswith(f'{name}{{model="{model_id}"}}'))
    return float(line.split()[-1])


def rss_mib(pid: int) -> float:
    return rss_kb(pid) / 1024


def ask(client: OpenAI, model_id: str) -> str:
    reply = client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=4)
    return reply.choices[0].finish_reason


def test_three_models_under_a_budget_for_two(tmp_path: Path, tiny_llama_dir: Path) -> None:
    models = [model(name, tiny_llama_dir, keep_alive=-1) for name in ("a", "b", "c")]
    one = estimate_bytes(ModelConfig(**models[0]), resolve_source(str(tiny_llama_dir)), "cpu")
    budget = int(one * 2.5)  # room for two, never three
    config = write_config(tmp_path / "models.yaml", models, memory_budget={"cpu": budget})
    log_path = tmp_path / "server.log"
    with running_server("--config", str(config), log_path=log_path) as (base, _):
        assert states(base) == {"a": "unloaded", "b": "unloaded", "c": "unloaded"}
        client = OpenAI(base_url=base, api_key="none", max_retries=0)
        most_loaded = 0
        for name in ["a", "b", "c"] * 3:  # round robin: every request completes (200)
            assert ask(client, name) in ("stop", "length")
            now = states(base)
            assert now[name] == "loaded"
            loaded = sum(state == "loaded" for state in now.values())
            most_loaded = max(most_loaded, loaded)
            assert loaded <= 2, now
        assert most_loaded == 2
        evictions = sum(gauge(base, "hearth_model_evictions_total", m) for m in "abc")
        assert evictions == 7  # every load after the first two evicted the idle LRU model
        [unloaded] = [m for m, s in states(base).items() if s == "unloaded"]

        # Ten concurrent first requests to the unloaded model: one load.
        loads_before = gauge(base, "hearth_model_loads_total", unloaded)
        with ThreadPoolExecutor(10) as pool:
            reasons = list(pool.map(lambda _: ask(client, unloaded), range(10)))
        assert all(r in ("stop", "length") for r in reasons)
        assert gauge(base, "hearth_model_loads_total", unloaded) == loads_before + 1
        log = log_path.read_text()
        started = log.count(f"{unloaded}: loading (first use)")
        assert started == loads_before + 1, log[-3000:]
        print(f"\n{unloaded}: 10 concurrent first requests -> 1 load ({started} in all)")


def test_keep_alive_unloads_and_gives_memory_back(tmp_path: Path, tiny_llama_dir: Path) -> None:
    warm = model("warm", tiny_llama_dir, load="at_start")
    # the default SmolLM2 GGUF: ~0.5 GiB of packed float32 weights, resident once loaded (a KV
    # cache would not do: on the CPU its pages are committed only as sequences use them)
    big = model("big", DEFAULT_GGUF, keep_alive="3s")
    config = write_config(tmp_path / "models.yaml", [warm, big])
    with running_server("--config", str(config)) as (base, proc):
        client = OpenAI(base_url=base, api_key="none", max_retries=0)
        assert states(base) == {"warm": "loaded", "big": "unloaded"}
        assert ask(client, "warm")
        before = rss_mib(proc.pid)
        assert ask(client, "big")
        loaded = rss_mib(proc.pid)
        deadline = time.monotonic() + 30
        while states(base)["big"] != "unloaded":
            assert time.monotonic() < deadline, "keep_alive did not unload"
            time.sleep(0.25)
        after = rss_mib(proc.pid)
        print(f"\nRSS MiB: before load {before:.0f}, loaded {loaded:.0f}, unloaded {after:.0f}")
        assert loaded - before > 200  # its weights
        assert after - before < 0.25 * (loaded - before)  # given back, near the level before
        assert states(base)["warm"] == "loaded"  # keep_alive -1 at start: stays
        assert ask(client, "big")  # loads again on use


def test_one_model_still_loads_at_start(tmp_path: Path, tiny_llama_dir: Path) -> None:
    config = tiny_config(tmp_path / "models.yaml", tiny_llama_dir, autotune="off")
    with running_server("--config", str(config)) as (base, _):
        assert states(base) == {"tiny": "loaded"}  # before any request
        client = OpenAI(base_url=base, api_key="none", max_retries=0)
        assert ask(client, "tiny")
        assert gauge(base, "hearth_model_loads_total", "tiny") == 1
