"""GET /health, GET /v1/models, GET /v1/models/{id}: the routes that serve no generation.

/v1/models lists every configured model with its `state` (loaded, loading, unloading,
unloaded): a model loaded on demand is listed before its first use."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hearth.engine.types import EngineClient
from hearth.server.auth import require_api_key
from hearth.server.model_manager import ModelPlan
from hearth.server.registry import ModelRegistry

STARTED = int(time.time())  # `created` of a model not loaded yet

router = APIRouter()


@router.get("/health", include_in_schema=False)
async def health(request: Request) -> JSONResponse:
    registry = request.app.state.registry
    status = 200 if registry.healthy else 503
    state = registry.state if registry.state != "ready" or status == 200 else "engine_dead"
    return JSONResponse({"status": state}, status_code=status)


@router.get("/health/live", include_in_schema=False)
async def live(request: Request) -> JSONResponse:
    """Liveness (Kubernetes restarts the pod on failure): 200 while loading, serving or draining;
    503 once an engine thread has died, which nothing but a restart brings back."""
    dead = [e.info.model_id for e in request.app.state.registry.engines if not e.is_alive]
    if dead and request.app.state.registry.state in ("ready", "draining"):
        return JSONResponse({"status": "engine_dead", "models": dead}, status_code=503)
    return JSONResponse({"status": "alive"})


def model_card(engine: EngineClient, state: str = "loaded") -> dict[str, Any]:
    info = engine.info
    return {
        "id": info.model_id,
        "object": "model",
        "created": info.created,
        "owned_by": "hearth",
        "max_model_len": info.max_model_len,
        "task": info.task,  # generate | embed | rerank
        "state": state,  # loaded | loading | unloading | unloaded (server/model_manager.py)
        **({"parent": info.parent} if info.parent else {}),  # a LoRA adapter's base model
    }


def plan_card(plan: ModelPlan, state: str) -> dict[str, Any]:
    """The card of a model loaded on demand that has no engine now (max_model_len: the
    configured one, None until it loads when the config leaves it to the checkpoint)."""
    return {
        "id": plan.model_id,
        "object": "model",
        "created": STARTED,
        "owned_by": "hearth",
        "max_model_len": plan.max_model_len,
        "task": plan.task,
        "state": state,
    }


def cards(registry: ModelRegistry) -> list[dict[str, Any]]:
    """Every configured model with its state, then the LoRA adapters."""
    served = [model_card(e, registry.model_state(e.info.model_id)) for e in registry.served]
    waiting = [plan_card(p, registry.model_state(p.model_id)) for p in registry.unloaded_plans]
    return served + waiting


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    registry = request.app.state.registry
    registry.check_serving()
    return {"object": "list", "data": cards(registry)}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    registry = request.app.state.registry
    registry.check_serving()
    known = {c["id"]: c for c in cards(registry)}
    card = known.get(registry.canonical(model_id))
    if card is None or card["state"] == "loaded":  # a 404 naming the models; 503: engine died
        engine = registry.get(model_id, task=None)
        card = model_card(engine, registry.model_state(engine.info.model_id))
    return {**card, "id": model_id} if model_id != card["id"] else card
