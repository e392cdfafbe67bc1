"""POST /v1/files (multipart: `file`, `purpose`), GET /v1/files, GET|DELETE /v1/files/{id},
GET /v1/files/{id}/content: OpenAI's Files API over server/files/store.py."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response

from hearth.server.auth import require_api_key
from hearth.server.errors import APIError
from hearth.server.files.store import PURPOSES, FileStore

router = APIRouter()
AUTH = [Depends(require_api_key)]


def get_files(request: Request) -> FileStore:
    return request.app.state.files


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {file_id}", param="id")


@router.post("/v1/files", dependencies=AUTH)
async def create_file(
    request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
) -> dict[str, Any]:
    if purpose not in PURPOSES:
        allowed = ", ".join(f"'{p}'" for p in PURPOSES)
        raise APIError(400, f"purpose must be one of {allowed}, got '{purpose}'.", param="purpose")
    data = await file.read()
    limit = request.app.state.settings.max_file_bytes
    if len(data) > limit:
        raise APIError(413, f"The file is larger than {limit} bytes.", param="file")
    if not data:
        raise APIError(400, "The file is empty.", param="file")
    name = file.filename or "upload.jsonl"
    return await asyncio.to_thread(get_files(request).create, data, name, purpose)  # off the loop


@router.get("/v1/files", dependencies=AUTH)
async def list_files(
    request: Request,
    purpose: str | None = None,
    after: str | None = None,
    limit: int = Query(10000, ge=1, le=10000),
    order: Literal["asc", "desc"] = "desc",
) -> dict[str, Any]:
    return get_files(request).page(purpose, after, limit, order)


@router.get("/v1/files/{file_id}", dependencies=AUTH)
async def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    found = get_files(request).get(file_id)
    if found is None:
        raise not_found(file_id)
    return found


@router.get("/v1/files/{file_id}/content", dependencies=AUTH)
async def file_content(file_id: str, request: Request) -> Response:
    data = await asyncio.to_thread(get_files(request).content, file_id)
    if data is None:
        raise not_found(file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", dependencies=AUTH)
async def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    if not get_files(request).delete(file_id):
        raise not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
