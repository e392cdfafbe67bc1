"""POST /v1/batches, GET /v1/batches (newest first, `after`/`limit`), GET /v1/batches/{id},
POST /v1/batches/{id}/cancel: OpenAI's Batch API over server/batches/runner.py."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends, Query, Request

from hearth.server.auth import require_api_key
from hearth.server.batches.protocol import BatchRequest, new_batch
from hearth.server.batches.runner import CANCELLABLE, BatchRunner
from hearth.server.batches.store import BatchStore
from hearth.server.errors import APIError

router = APIRouter()
AUTH = [Depends(require_api_key)]


def _runner(request: Request) -> BatchRunner:
    return request.app.state.batch_runner


def _found(store: BatchStore, batch_id: str) -> dict[str, Any]:
    batch = store.get(batch_id)
    if batch is None:
        raise APIError(404, f"No such batch: {batch_id}", param="batch_id")
    return batch


@router.post("/v1/batches", dependencies=AUTH)
async def create_batch(body: BatchRequest, request: Request) -> dict[str, Any]:
    runner = _runner(request)
    found = runner.files.get(body.input_file_id)
    if found is None:
        raise APIError(404, f"No such File object: {body.input_file_id}", param="input_file_id")
    if found["purpose"] != "batch":
        message = f"File {body.input_file_id} has purpose '{found['purpose']}', not 'batch'."
        raise APIError(400, message, param="input_file_id")
    batch = new_batch(f"batch_{uuid.uuid4().hex}", body)
    runner.store.create(batch)
    runner.start(batch["id"])
    return _found(runner.store, batch["id"])


@router.get("/v1/batches", dependencies=AUTH)
async def list_batches(
    request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)
) -> dict[str, Any]:
    return _runner(request).store.page(after, limit)


@router.get("/v1/batches/{batch_id}", dependencies=AUTH)
async def retrieve_batch(batch_id: str, request: Request) -> dict[str, Any]:
    return _found(_runner(request).store, batch_id)


@router.post("/v1/batches/{batch_id}/cancel", dependencies=AUTH)
async def cancel_batch(batch_id: str, request: Request) -> dict[str, Any]:
    runner = _runner(request)
    batch = _found(runner.store, batch_id)
    if batch["status"] not in CANCELLABLE:
        raise APIError(400, f"A batch that is {batch['status']} cannot be cancelled.")
    return await runner.cancel(batch)
