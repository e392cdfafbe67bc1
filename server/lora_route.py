"""LoRA adapters on the wire: each adapter is a model id of its own, plus vLLM's runtime routes.

- `LoraView` is the EngineClient a route gets for an adapter's id (server/registry.py): the base
  model's engine with `SamplingParams.lora` set, so every route (chat, completions, responses,
  tokenize) serves adapters with no code of its own. It counts the adapter's requests in flight.
- `POST /v1/load_lora_adapter {"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter
  {"lora_name"}` (vLLM's names, bodies and plain-text answers), served only with
  `--allow-runtime-lora` (404 otherwise) and behind the API key when keys are set. Loading reads
  the adapter on a worker thread (generation goes on); unloading first stops new requests, then
  waits for the adapter's requests in flight, then frees its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from hearth.engine.types import EngineClient, GenerationOutput, GenerationRequest
from hearth.server.auth import require_api_key
from hearth.server.errors import APIError

router = APIRouter()


class LoraView:
    """An adapter served as a model: `base`'s engine, every request run with adapter `name`."""

    def __init__(self, base: EngineClient, name: str, source: str) -> None:
        self.base, self.name = base, name
        self.info = dataclasses.replace(
            base.info,
            model_id=name,
            source=source,
            aliases=[],
            parent=base.info.model_id,
            created=int(time.time()),
        )
        self.in_flight = 0  # this adapter's requests being generated
        # unloaded: a request that resolved this view before then is refused, never run with
        # whatever is later loaded under the same name
        self.retired = False

    def __getattr__(self, attr: str) -> Any:  # encode, decode, abort, stats, is_alive, ...
        return getattr(self.base, attr)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The base engine's stream for `request`, run with this adapter."""
        self.in_flight += 1  # before the check: an unload now waits for this request
        try:  # closed at once (abort included) when the client goes, before in_flight drops
            if self.retired:
                raise APIError(
                    404,
                    f"The lora adapter '{self.name}' was unloaded while the request was being "
                    "prepared; retry it.",
                    param="model",
                    code="model_not_found",
                )
            request.sampling.lora = self.name
            async with contextlib.aclosing(self.base.generate(request)) as outputs:
                async for output in outputs:
                    yield output
        finally:
            self.in_flight -= 1

    async def drained(self, poll_s: float = 0.02) -> None:
        """Return once no request of this adapter is in flight."""
        while self.in_flight > 0:
            await asyncio.sleep(poll_s)


class LoadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)
    base_model_name: str | None = None  # hearth: which model; default the only generator


class UnloadLoraBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    lora_name: str = Field(min_length=1)


def _check_enabled(request: Request) -> None:
    if not request.app.state.settings.allow_runtime_lora:
        raise APIError(
            404,
            "Runtime LoRA loading is off: start hearth with --allow-runtime-lora.",
            code="not_found",
        )


@router.post("/v1/load_lora_adapter", dependencies=[Depends(require_api_key)])
async def load_lora_adapter(body: LoadLoraBody, request: Request) -> PlainTextResponse:
    _check_enabled(request)
    registry = request.app.state.registry
    registry.check_serving()
    name = body.lora_name
    if registry.has_name(name):
        message = f"The lora adapter '{name}' has already been loaded."
        raise APIError(400, message, param="lora_name")
    base = registry.lora_base(body.base_model_name)
    await base.load_lora(name, body.lora_path)  # AdapterError: a 400 naming the adapter
    try:
        registry.add_adapter(LoraView(base, name, body.lora_path))
    except BaseException:
        base.unload_lora(name)
        raise
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=[Depends(require_api_key)])
async def unload_lora_adapter(body: UnloadLoraBody, request: Request) -> PlainTextResponse:
    _check_enabled(request)
    registry = request.app.state.registry
    view = registry.remove_adapter(body.lora_name)
    if view is None:
        raise APIError(
            404,
            f"The lora adapter '{body.lora_name}' cannot be found.",
            param="lora_name",
            code="not_found",
        )
    view.retired = True  # requests that resolved it and have not started never will
    await view.drained()
    view.base.unload_lora(view.name)
    return PlainTextResponse(f"Success: LoRA adapter '{view.name}' removed successfully.")
