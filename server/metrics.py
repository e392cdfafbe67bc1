"""Prometheus metrics: requests by route and status, tokens, latencies, engine load."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from hearth.engine.types import EngineClient
from hearth.server.model_manager import Slot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# The engine-load gauges a client polls to see a model idle (soak runs, tests).
CLIENT_CLOSED = 499  # the status a request is counted as when its client left first
BATCH_STATUSES = (  # OpenAI's Batch statuses (server/batches/protocol.py)
    "validating",
    "in_progress",
    "finalizing",
    "completed",
    "failed",
    "expired",
    "cancelling",
    "cancelled",
)
LOAD_GAUGES = ("hearth_requests_running", "hearth_requests_waiting", "hearth_kv_cache_usage_ratio")


def read_load_gauges(page: str, model: str) -> dict[str, float]:
    """The LOAD_GAUGES of one model found in a /metrics page (a gauge it lacks is absent)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(page)
        for sample in family.samples
        if sample.name in LOAD_GAUGES and sample.labels.get("model") == model
    }


class _EngineCollector:
    """Reads each engine's stats at scrape time (no background work)."""

    def __init__(self, engines: Callable[[], list[EngineClient]]) -> None:
        self.engines = engines

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "running": GaugeMetricFamily(
                "hearth_requests_running", "Sequences decoding", labels=["model"]
            ),
            "waiting": GaugeMetricFamily(
                "hearth_requests_waiting", "Sequences queued", labels=["model"]
            ),
            "kv": GaugeMetricFamily(
                "hearth_kv_cache_usage_ratio", "KV blocks in use / total", labels=["model"]
            ),
            "hits": GaugeMetricFamily(
                "hearth_prefix_cache_hit_tokens",
                "Prompt tokens served from the prefix cache",
                labels=["model"],
            ),
            "threads": GaugeMetricFamily(
                "hearth_cpu_threads",
                "CPU threads the model's engine runs its steps on now (follows free cores)",
                labels=["model"],
            ),
            "task": GaugeMetricFamily(
                "hearth_model_task", "1 per served model and its task", labels=["model", "task"]
            ),
            "proposed": CounterMetricFamily(
                "hearth_spec_decode_draft_tokens",
                "Speculative decoding: draft tokens verified",
                labels=["model"],
            ),
            "accepted": CounterMetricFamily(
                "hearth_spec_decode_accepted_tokens",
                "Speculative decoding: draft tokens accepted",
                labels=["model"],
            ),
            "acceptance": GaugeMetricFamily(
                "hearth_spec_decode_acceptance_ratio",
                "Speculative decoding: accepted / verified draft tokens so far",
                labels=["model"],
            ),
            "by_priority": GaugeMetricFamily(
                "hearth_requests_waiting_by_priority",
                "Sequences queued, per scheduling priority (lower runs first)",
                labels=["model", "priority"],
            ),
        }
        for engine in self.engines():
            stats, model = engine.stats(), engine.info.model_id
            families["running"].add_metric([model], stats.num_running)
            families["waiting"].add_metric([model], stats.num_waiting)
            total = max(1, stats.kv_blocks_total)
            families["kv"].add_metric([model], stats.kv_blocks_used / total)
            families["hits"].add_metric([model], stats.prefix_cache_hits)
            families["task"].add_metric([model, engine.info.task], 1)
            if stats.cpu_threads:
                families["threads"].add_metric([model], stats.cpu_threads)
            if stats.spec_proposed_tokens:  # models that speculate
                proposed, accepted = stats.spec_proposed_tokens, stats.spec_accepted_tokens
                families["proposed"].add_metric([model], proposed)
                families["accepted"].add_metric([model], accepted)
                families["acceptance"].add_metric([model], accepted / proposed)
            for priority, count in sorted(stats.waiting_by_priority.items()):
                families["by_priority"].add_metric([model, str(priority)], count)
        yield from families.values()


# batches by status, batch lines done by outcome, batch lines in the engines now
BatchCounts = tuple[dict[str, int], dict[str, int], int]


class _BatchCollector:
    """Batches by status and batch lines done (server/batches/store.py, read at scrape time)."""

    def __init__(self, counts: Callable[[], BatchCounts]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        by_status, done, in_flight = self.counts()
        batches = GaugeMetricFamily("hearth_batches", "Batches by status", labels=["status"])
        for status in BATCH_STATUSES:
            batches.add_metric([status], by_status.get(status, 0))
        lines = CounterMetricFamily(
            "hearth_batch_lines", "Batch lines done, by outcome", labels=["outcome"]
        )
        for outcome in ("completed", "failed"):
            lines.add_metric([outcome], done.get(outcome, 0))
        running = GaugeMetricFamily(
            "hearth_batch_lines_in_flight", "Batch lines in the engines now (all batches)"
        )
        running.add_metric([], in_flight)
        yield from (batches, lines, running)


class _ModelStateCollector:
    """Per configured model: loaded (1/0), the last load's seconds, loads and evictions
    (server/model_manager.py's slots, read at scrape time)."""

    def __init__(self, slots: Callable[[], Iterable[Slot]]) -> None:
        self.slots = slots

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        loaded = GaugeMetricFamily("hearth_model_loaded", "1: loaded now", labels=["model"])
        seconds = GaugeMetricFamily(
            "hearth_model_load_seconds", "Duration of the last load", labels=["model"]
        )
        loads = CounterMetricFamily("hearth_model_loads", "Loads (first use)", labels=["model"])
        evictions = CounterMetricFamily(
            "hearth_model_evictions", "Unloads to make room for another model", labels=["model"]
        )
        for slot in self.slots():
            model = slot.plan.model_id
            loaded.add_metric([model], 1 if slot.state == "loaded" else 0)
            seconds.add_metric([model], slot.load_seconds)
            loads.add_metric([model], slot.loads)
            evictions.add_metric([model], slot.evictions)
        yield from (loaded, seconds, loads, evictions)


class Metrics:
    def __init__(
        self,
        engines: Callable[[], list[EngineClient]],
        models: Callable[[], Iterable[Slot]] = lambda: (),
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hearth_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "hearth_prompt_tokens",
            "Prompt tokens of started requests",
            ["model"],
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "hearth_generation_tokens", "Generated tokens", ["model"], registry=self.registry
        )
        self.ttft = Histogram(
            "hearth_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "hearth_inter_token_latency_seconds",
            "Time between tokens",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engines))
        self.registry.register(_ModelStateCollector(models))

    def watch_batches(self, counts: Callable[[], BatchCounts]) -> None:
        """Report the Batch API's counts (server/app.py wires the batch store's)."""
        self.registry.register(_BatchCollector(counts))

    def request_started(self, model: str, prompt_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def inter_token(self, model: str, seconds: float, tokens: int) -> None:
        self.itl.labels(model).observe(seconds / max(1, tokens))

    def request_finished(self, model: str, completion_tokens: int) -> None:
        self.generation_tokens.labels(model).inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware counting responses by route template and status code.

    A client that disconnects before its response is complete is counted as 499 (nginx's
    "client closed request"), streamed or not, whatever the app sent it; a send that fails
    because the client is gone ends the request quietly.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"code": 500, "complete": False, "gone": False}

        async def watching_receive() -> dict:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["complete"]:
                state["gone"] = True
            return message

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            try:
                await send(message)
            except OSError:  # ASGI 2.4 servers raise on a send to a client that is gone
                state["gone"] = True
                raise
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True

        try:
            await self.app(scope, watching_receive, counting_send)
        except Exception:
            if not state["gone"]:
                raise
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            code = CLIENT_CLOSED if state["gone"] else state["code"]
            self.metrics.requests.labels(path, str(code)).inc()
