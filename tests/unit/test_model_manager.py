"""Models loaded on demand (server/model_manager.py) over fake engines: the budget fit, the LRU
choice of victims, keep_alive timers, shared loads, 503s with Retry-After, and the HTTP side
(/v1/models states, /metrics gauges, the admin routes). The real server: tests/live/
test_on_demand.py."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fastapi.testclient import TestClient

from hearth.engine.config import ConfigError, ModelConfig, parse_duration
from hearth.engine.types import EngineStats
from hearth.server.app import create_app
from hearth.server.model_manager import (
    LoadFailed,
    ModelManager,
    ModelPlan,
    NoRoom,
    Slot,
    choose_victims,
    fits,
    idle_expired,
    request_leases,
)
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine

MB = 1 << 20


def plan(model_id: str, size: int = 100 * MB, keep: float | None = 60.0, **keys) -> ModelPlan:
    return ModelPlan(model_id, "cpu", size, on_demand=True, keep_alive_s=keep, **keys)


def loaded(model_id: str, last_used: float, size: int = 100 * MB, **keys) -> Slot:
    return Slot(plan(model_id, size, **keys), "loaded", FakeEngine(model_id), last_used=last_used)


class Busy(FakeEngine):
    def stats(self) -> EngineStats:
        return EngineStats(num_running=1, num_waiting=0, kv_blocks_used=1, kv_blocks_total=8)


# -- the policy ---------------------------------------------------------------------------------
def test_fits_under_a_budget_or_without_one() -> None:
    assert fits(100, 100, 200) and not fits(101, 100, 200)
    assert fits(10**15, 10**15, None)


def test_least_recently_used_idle_models_are_chosen_as_few_as_needed() -> None:
    a, b, c = loaded("a", 3.0), loaded("b", 1.0), loaded("c", 2.0)
    incoming = Slot(plan("d"))
    assert choose_victims([a, b, c, incoming], incoming, 400 * MB) == []
    assert choose_victims([a, b, c, incoming], incoming, 300 * MB) == [b]  # oldest first
    assert choose_victims([a, b, c, incoming], incoming, 200 * MB) == [b, c]
    big = Slot(plan("big", 250 * MB))
    assert choose_victims([a, b, c, big], big, 300 * MB) == [b, c, a]
    assert choose_victims([a, b, c, big], Slot(plan("huge", 301 * MB)), 300 * MB) is None


def test_busy_pinned_and_other_devices_are_never_victims() -> None:
    leased = loaded("leased", 0.0)
    leased.leases = 1
    running = Slot(plan("running"), "loaded", Busy("running"), last_used=0.0)
    pinned = loaded("pinned", 0.0, pinned=True)
    gpu = Slot(replace_device(plan("gpu"), "cuda:0"), "loaded", FakeEngine("gpu"))
    idle = loaded("idle", 5.0)
    incoming = Slot(plan("new"))
    slots = [leased, running, pinned, gpu, idle, incoming]
    assert choose_victims(slots, incoming, 450 * MB) == [idle]
    assert choose_victims(slots, incoming, 350 * MB) is None  # nothing idle left to evict
    loading = Slot(plan("loading"), "loading")  # reserved while it loads
    assert choose_victims([loading, incoming], incoming, 150 * MB) is None


def replace_device(p: ModelPlan, device: str) -> ModelPlan:
    from dataclasses import replace

    return replace(p, device=device)


def test_keep_alive_expiry() -> None:
    slot = loaded("a", 100.0)
    assert not idle_expired(slot, 159.0) and idle_expired(slot, 160.0)
    assert not idle_expired(loaded("never", 0.0, keep=None), 10**9)
    assert idle_expired(loaded("zero", 100.0, keep=0.0), 100.0)
    slot.leases = 1
    assert not idle_expired(slot, 10**9)
    assert not idle_expired(Slot(plan("busy"), "loaded", Busy("busy")), 10**9)
    assert not idle_expired(loaded("pinned", 0.0, pinned=True), 10**9)


def test_durations_and_config_keys() -> None:
    assert [parse_duration(v) for v in (5, "30s", "5m", "1h30m", "500ms", "0", -1, "-1")] == [
        5.0, 30.0, 300.0, 5400.0, 0.5, 0.0, -1.0, -1.0,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="duration"):
        parse_duration("5 minutes")
    model = ModelConfig(id="a", source="x", load="on_demand", keep_alive="2m", memory="1GiB")
    assert (model.keep_alive, int(model.memory or 0)) == (120.0, 1 << 30)
    from hearth.engine.config import parse_config

    with pytest.raises(ConfigError, match="memory_budget"):
        parse_config({"models": [{"id": "a", "source": "x"}], "memory_budget": {"tpu": "1GB"}})
    with pytest.raises(ConfigError, match="keep_alive"):
        parse_config({"models": [{"id": "a", "source": "x", "keep_alive": "soon"}]})


# -- the manager --------------------------------------------------------------------------------
class Loader:
    """Builds FakeEngines slowly in worker threads, counting loads and unloads."""

    def __init__(self, delay: float = 0.05, fail: str | None = None) -> None:
        self.delay, self.fail = delay, fail
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.lock = threading.Lock()

    def load(self, model_id: str) -> FakeEngine:
        time.sleep(self.delay)
        if model_id == self.fail:
            raise OSError("no such file: weights.safetensors")
        with self.lock:
            self.loads.append(model_id)
        return FakeEngine(model_id)

    def unload(self, engine: FakeEngine) -> None:
        self.unloads.append(engine.info.model_id)


def manager(loader: Loader, budget: int | None, *plans: ModelPlan) -> ModelManager:
    return ModelManager(list(plans), {"cpu": budget}, loader.load, loader.unload)


def test_concurrent_first_requests_share_one_load() -> None:
    loader = Loader(delay=0.2)
    models = manager(loader, None, plan("a"))

    async def main() -> list:
        return await asyncio.gather(*(models.ensure("a") for _ in range(10)))

    engines = asyncio.run(main())
    assert loader.loads == ["a"] and len({id(e) for e in engines}) == 1
    assert models.slots["a"].loads == 1 and models.state("a") == "loaded"


def test_lru_eviction_keeps_two_of_three_loaded() -> None:
    loader = Loader()
    models = manager(loader, 250 * MB, plan("a"), plan("b"), plan("c"))

    async def main() -> None:
        for name in ["a", "b", "c", "a", "b", "c"]:
            with request_leases():
                await models.ensure(name)
                held = [s for s in models.slots.values() if s.state != "unloaded"]
                assert len(held) <= 2

    asyncio.run(main())
    assert loader.unloads == ["a", "b", "c", "a"]  # each time the least recently used
    assert sum(s.evictions for s in models.slots.values()) == 4


def test_no_room_while_the_others_serve_then_room_after() -> None:
    loader = Loader()
    models = manager(loader, 150 * MB, plan("a"), plan("b"))

    async def main() -> None:
        with request_leases():
            await models.ensure("a")  # a's request is in flight
            with pytest.raises(NoRoom, match=r"'b'.*requests in flight"):
                await models.ensure("b")
            assert models.state("b") == "unloaded"
        await models.ensure("b")  # a is idle now: evicted
        assert (models.state("a"), models.state("b")) == ("unloaded", "loaded")

    asyncio.run(main())


def test_a_failed_load_names_the_model_and_the_cause_and_is_retried() -> None:
    loader = Loader(fail="a")
    models = manager(loader, None, plan("a"))

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(LoadFailed, match="'a' failed to load: no such file"):
                await models.ensure("a")
            assert models.state("a") == "unloaded"

    asyncio.run(main())


def test_keep_alive_unloads_an_idle_model_after_its_last_request() -> None:
    loader = Loader(delay=0.0)
    models = manager(loader, None, plan("a", keep=0.2), plan("zero", keep=0.0))

    async def main() -> None:
        with request_leases():
            await models.ensure("a")
            await asyncio.sleep(0.4)  # a request in flight: never unloaded under it
            assert models.state("a") == "loaded"
        await asyncio.sleep(0.1)
        assert models.state("a") == "loaded"
        await asyncio.sleep(0.3)
        assert models.state("a") == "unloaded"
        with request_leases():
            await models.ensure("zero")
        await asyncio.sleep(0.05)
        assert models.state("zero") == "unloaded"

    asyncio.run(main())
    assert loader.unloads == ["a", "zero"]


# -- over HTTP ----------------------------------------------------------------------------------
@pytest.fixture
def client() -> TestClient:
    loader = Loader(delay=0.05)
    plans = [plan("a", keep=None), plan("b", keep=None), plan("emb", task="embed")]
    registry = ModelRegistry()
    models = manager(loader, 250 * MB, *plans)
    registry.manage(models)
    models.loaded(loader.load("a"))
    registry.mark_ready()
    app = create_app(registry, ServerSettings(api_keys=("k",)))
    app.state.loader = loader
    return TestClient(app, headers={"Authorization": "Bearer k"})


def test_models_list_states_and_first_use_loads(client: TestClient) -> None:
    states = {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}
    assert states == {"a": "loaded", "b": "unloaded", "emb": "unloaded"}
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert client.get("/v1/models/b").json()["state"] == "loaded"
    refused = client.post("/v1/chat/completions", json={**chat, "model": "emb"})
    assert refused.status_code == 400 and "embedding model" in refused.json()["error"]["message"]
    assert client.get("/v1/models/emb").json()["state"] == "unloaded"  # never loaded for that
    page = client.get("/metrics").text
    assert 'hearth_model_loaded{model="b"} 1.0' in page
    assert 'hearth_model_loads_total{model="b"} 1.0' in page


def test_admin_routes_load_and_unload(client: TestClient) -> None:
    assert client.post("/v1/load_model", json={"model": "b"}).json()["state"] == "loaded"
    assert client.post("/v1/load_model", json={"model": "emb"}).json()["state"] == "loaded"
    states = {m["id"]: m["state"] for m in client.get("/v1/models").json()["data"]}
    assert states == {"a": "unloaded", "b": "loaded", "emb": "loaded"}  # a: LRU, evicted
    assert 'hearth_model_evictions_total{model="a"} 1.0' in client.get("/metrics").text
    assert client.post("/v1/unload_model", json={"model": "b"}).json()["state"] == "unloaded"
    missing = client.post("/v1/unload_model", json={"model": "nope"})
    assert missing.status_code == 404 and "Available models: a, b, emb" in missing.text
    anonymous = TestClient(client.app).post("/v1/load_model", json={"model": "b"})
    assert anonymous.status_code == 401


def test_no_room_is_a_503_with_retry_after(client: TestClient) -> None:
    models = client.app.state.registry.manager
    models.budgets["cpu"] = 50 * MB
    chat = {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    response = client.post("/v1/chat/completions", json=chat)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert "over the whole budget" in response.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_estimate_counts_weights_kv_and_workspace(tmp_path) -> None:
    """Before loading: the checkpoint's weight files scaled to the dtype it loads in (twice on
    CPU for the packed matmul copy), the KV budget, a step's logits and activations; `memory:`
    replaces it all."""
    from hearth.engine.loading.sources import resolve_source
    from hearth.on_demand import estimate_bytes, plan_models

    (tmp_path / "config.json").write_text(
        '{"hidden_size": 64, "vocab_size": 1000, "dtype": "bfloat16"}'
    )
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    source = resolve_source(str(tmp_path))
    engine = {"kv_cache_memory": "8MiB", "max_num_batched_tokens": 16}
    config = ModelConfig(id="m", source=str(tmp_path), device="cpu", engine=engine)
    workspace = 16 * 4 * (1000 + 16 * 64) + 64 * MB
    assert estimate_bytes(config, source, "cpu") == 2 * 2000 + 8 * MB + workspace
    no_pack = config.model_copy(
        update={"engine": config.engine.model_copy(update={"cpu_matmul": False})}
    )
    assert estimate_bytes(no_pack, source, "cpu") == 2000 + 8 * MB + workspace
    embed = config.model_copy(update={"task": "embed"})
    assert estimate_bytes(embed, source, "cpu") == 2000 + workspace  # no KV, no packed copy
    fixed = ModelConfig(id="m", source=str(tmp_path), memory="1GiB")
    assert estimate_bytes(fixed, source, "cpu") == 1 << 30
    one, several = (
        plan_models([config], {"m": source}, set()),
        plan_models(
            [config, config.model_copy(update={"id": "n"})], {"m": source, "n": source}, {"n"}
        ),
    )
    assert (one[0].on_demand, one[0].keep_alive_s) == (False, None)  # one model: at start
    assert (several[0].on_demand, several[0].keep_alive_s) == (True, 300.0)  # several: on demand
    assert (several[1].on_demand, several[1].pinned) == (False, True)  # a LoRA base stays
