"""The served models by id and alias, and the server's lifecycle state (loading/ready/draining).

Models loaded on demand (server/model_manager.py) have their names here from the start; a route
`acquire`s its model, which loads it on first use.
"""

from __future__ import annotations

from typing import Literal

from hearth.engine.types import EngineClient
from hearth.server.errors import APIError, engine_dead
from hearth.server.model_manager import LoadFailed, ModelManager, ModelPlan, NoRoom, Slot

State = Literal["loading", "ready", "draining", "failed"]
Task = Literal["generate", "embed", "rerank"]
_IS = {  # the model's task -> what it is and serves
    "embed": "an embedding model: it serves /v1/embeddings only",
    "rerank": "a rerank model: it serves /v1/rerank and /score only",
    "generate": "a generation model: it does not serve {route}",
}
_ROUTES = {"embed": "/v1/embeddings", "rerank": "/v1/rerank or /score", "generate": "that route"}


def _wrong_task(name: str, task: str, wanted: str) -> str:
    """Why a route of task `wanted` refuses the model `name` of task `task`."""
    return f"The model '{name}' is {_IS[task].format(route=_ROUTES[wanted])}."


class ModelRegistry:
    def __init__(self) -> None:
        self.state: State = "loading"
        self._engines: dict[str, EngineClient] = {}  # id -> engine
        self._names: dict[str, str] = {}  # id or alias -> id
        self._adapters: dict[str, EngineClient] = {}  # LoRA adapter id -> its view (lora_route)
        self.in_flight = 0  # HTTP requests being served (server.limits.RequestGuard counts)
        self.manager: ModelManager | None = None  # models loaded on demand, and their states

    def manage(self, manager: ModelManager) -> None:
        """Serve the manager's models: every name known now, engines added as they load."""
        self.manager = manager
        manager.on_loaded, manager.on_unloaded = self.add, self.remove
        for plan in manager.plans:
            for name in (plan.model_id, *plan.aliases):
                self._names[name] = plan.model_id

    def canonical(self, name: str) -> str:
        """The model id a name (id, alias or adapter id) stands for; the name if unknown."""
        return self._names.get(name, name)

    def remove(self, model_id: str) -> None:
        """Stop serving a model's engine (an unload); its names stay (it loads again on use)."""
        self._engines.pop(model_id, None)

    def model_state(self, model_id: str) -> str:
        """loaded | loading | unloading | unloaded (a model outside the manager: loaded)."""
        if self.manager is None or model_id not in self.manager.slots:
            return "loaded"
        return self.manager.state(model_id)

    def model_slots(self) -> list[Slot]:
        """The manager's slots (for /metrics); [] without one."""
        return list(self.manager.slots.values()) if self.manager else []

    @property
    def unloaded_plans(self) -> list[ModelPlan]:
        """The configured models that have no engine now (for /v1/models)."""
        plans = self.manager.plans if self.manager else []
        return [p for p in plans if p.model_id not in self._engines]

    async def acquire(self, name: str, task: Task | None = "generate") -> EngineClient:
        """`get`, loading a model on demand first (the request waits; other models keep
        serving). 503 with Retry-After when there is no room for it now, 503 naming the model
        and the cause when it fails to load."""
        self.check_serving()
        model_id = self._names.get(name)
        manager = self.manager
        if manager is None or model_id is None or model_id not in manager.slots:
            return self.get(name, task)
        plan = manager.slots[model_id].plan
        if task is not None and plan.task != task:
            raise APIError(400, _wrong_task(name, plan.task, task), param="model")
        try:
            await manager.ensure(model_id)
        except NoRoom as exc:
            retry = {"Retry-After": str(manager.retry_after_s)}
            raise APIError(503, str(exc), code="model_not_loaded", headers=retry) from None
        except LoadFailed as exc:
            raise APIError(503, str(exc), code="model_load_failed") from None
        return self.get(name, task)

    def add(self, engine: EngineClient) -> None:
        info = engine.info
        self._engines[info.model_id] = engine
        for name in (info.model_id, *info.aliases):
            self._names[name] = info.model_id

    def has_name(self, name: str) -> bool:
        return name in self._names or name in self._adapters

    def add_adapter(self, view: EngineClient) -> None:
        """Serve a LoRA adapter's view under its own id (ValueError if the id is taken)."""
        name = view.info.model_id
        if self.has_name(name):
            raise ValueError(f"model name {name!r} is used twice")
        self._adapters[name] = view

    def remove_adapter(self, name: str) -> EngineClient | None:
        """Stop serving adapter `name` (new requests get 404); its view, or None."""
        return self._adapters.pop(name, None)

    def lora_base(self, name: str | None) -> EngineClient:
        """The generation engine adapters load into: `name`'s, or the only one (else a 400)."""
        if name is not None:
            return self.get(name)
        bases = [e for e in self._engines.values() if e.info.task == "generate"]
        if len(bases) != 1:
            ids = ", ".join(e.info.model_id for e in bases) or "none"
            raise APIError(400, f"Set base_model_name: one of {ids}.", param="base_model_name")
        return bases[0]

    @property
    def served(self) -> list[EngineClient]:
        """Every model id served: the engines, then the LoRA adapters (/v1/models)."""
        return [*self._engines.values(), *self._adapters.values()]

    def mark_ready(self) -> None:
        if self.state == "loading":  # a stop signal during loading keeps it draining
            self.state = "ready"

    @property
    def engines(self) -> list[EngineClient]:
        return list(self._engines.values())

    @property
    def healthy(self) -> bool:
        return self.state == "ready" and all(e.is_alive for e in self._engines.values())

    def get(self, name: str, task: Task | None = "generate") -> EngineClient:
        """The engine serving `name`, or a 404 listing the available ids (503 while loading);
        a 400 naming the model if it serves another `task` (None: any task)."""
        self.check_serving()
        model_id = self._names.get(name)
        if model_id is None and name in self._adapters:
            return self._adapter(name, task)
        if model_id is None:
            available = ", ".join(sorted({*self._names.values(), *self._adapters})) or "none"
            raise APIError(
                404,
                f"The model '{name}' does not exist. Available models: {available}.",
                param="model",
                code="model_not_found",
            )
        engine = self._engines.get(model_id)
        if engine is None:  # loaded on demand (acquire), not loaded now
            raise APIError(
                503,
                f"The model '{name}' is not loaded; try again shortly.",
                code="model_not_loaded",
                headers={"Retry-After": "5"},
            )
        if not engine.is_alive:
            raise engine_dead(model_id)
        if task is not None and engine.info.task != task:
            raise APIError(400, _wrong_task(name, engine.info.task, task), param="model")
        return engine

    def _adapter(self, name: str, task: Task | None) -> EngineClient:
        view = self._adapters[name]
        if not view.is_alive:
            raise engine_dead(name)
        if task is not None and task != "generate":
            raise APIError(400, _wrong_task(name, "generate", task), param="model")
        return view

    def check_serving(self) -> None:
        if self.state != "ready":
            raise APIError(
                503,
                f"The server is {self.state}; try again shortly.",
                code="service_unavailable",
                headers={"Retry-After": "5"},
            )
