"""GET /health, GET /v1/models, GET /v1/models/{id}: the routes that serve no generation."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from hearth.engine.types import EngineClient
from hearth.server.auth import require_api_key

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


def model_card(engine: EngineClient) -> dict[str, Any]:
    info = engine.info
    return {
        "id": info.model_id,
        "object": "model",
        "created": info.created,
        "owned_by": "hearth",
        "max_model_len": info.max_model_len,
        "task": info.task,  # generate | embed | rerank
        **({"parent": info.parent} if info.parent else {}),  # a LoRA adapter's base model
    }


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def list_models(request: Request) -> dict[str, Any]:
    registry = request.app.state.registry
    registry.check_serving()
    return {"object": "list", "data": [model_card(e) for e in registry.served]}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(require_api_key)])
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    card = model_card(request.app.state.registry.get(model_id, task=None))
    return {**card, "id": model_id} if model_id != card["id"] else card
