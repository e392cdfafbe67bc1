"""Loading and unloading a configured model now, behind the API key (the LoRA routes' style:
server/lora_route.py). Named after vLLM's `/v1/load_lora_adapter`; llama-server's router mode
calls the same `POST /models/load` and `/models/unload`.

- `POST /v1/load_model {"model": ID}`: load it now (evicting idle models if the budget needs
  it); 503 with Retry-After when there is no room, 503 naming the cause when it fails.
- `POST /v1/unload_model {"model": ID}`: unload it once its requests in flight are done (they
  are never cut); the next request loads it again.

Both answer the model's /v1/models card with its `state`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from hearth.server.auth import require_api_key
from hearth.server.errors import APIError
from hearth.server.models_route import cards
from hearth.server.registry import ModelRegistry

router = APIRouter()


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)


def _managed(registry: ModelRegistry, name: str) -> str:
    """The id of configured model `name` (404 listing them if unknown)."""
    model_id = registry.canonical(name)
    if registry.manager is None or model_id not in registry.manager.slots:
        registry.get(name, task=None)  # a 404 naming the models, 503 while starting
        raise APIError(400, f"The model '{name}' cannot be loaded or unloaded.", param="model")
    return model_id


def _card(registry: ModelRegistry, model_id: str) -> dict[str, Any]:
    return next(c for c in cards(registry) if c["id"] == model_id)


@router.post("/v1/load_model", dependencies=[Depends(require_api_key)])
async def load_model(body: ModelBody, request: Request) -> dict[str, Any]:
    registry: ModelRegistry = request.app.state.registry
    registry.check_serving()
    model_id = _managed(registry, body.model)
    await registry.acquire(body.model, task=None)
    return _card(registry, model_id)


@router.post("/v1/unload_model", dependencies=[Depends(require_api_key)])
async def unload_model(body: ModelBody, request: Request) -> dict[str, Any]:
    registry: ModelRegistry = request.app.state.registry
    registry.check_serving()
    model_id = _managed(registry, body.model)
    assert registry.manager is not None
    if registry.manager.slots[model_id].plan.pinned:
        message = f"The model '{body.model}' serves LoRA adapters or tensor parallelism: it stays."
        raise APIError(400, message, param="model")
    await registry.manager.unload_now(model_id)
    return _card(registry, model_id)
