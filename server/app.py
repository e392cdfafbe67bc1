"""The FastAPI app factory: routes, error envelope, auth settings, CORS, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response

from hearth import __version__
from hearth.server.batches.route import router as batches_router
from hearth.server.batches.runner import BatchRunner
from hearth.server.batches.store import BatchStore
from hearth.server.chat.route import router as chat_router
from hearth.server.completions.route import router as completions_router
from hearth.server.embeddings.route import router as embeddings_router
from hearth.server.errors import install_error_handlers
from hearth.server.files.db import open_database
from hearth.server.files.route import router as files_router
from hearth.server.files.store import FileStore
from hearth.server.limits import RequestGuard
from hearth.server.lora_route import router as lora_router
from hearth.server.messages.route import router as messages_router
from hearth.server.metrics import Metrics, RequestCounter
from hearth.server.model_admin_route import router as model_admin_router
from hearth.server.models_route import router as models_router
from hearth.server.registry import ModelRegistry
from hearth.server.rerank.route import router as rerank_router
from hearth.server.responses.background import get_runs
from hearth.server.responses.route import router as responses_router
from hearth.server.responses.store import open_store
from hearth.server.settings import ServerSettings
from hearth.server.tokenize.route import router as tokenize_router
from hearth.server.ui_route import router as ui_router

MULTIPART_SLACK = 64 << 10  # an upload's body: the file and its multipart headers


def create_app(registry: ModelRegistry, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app over a registry of engines; the registry may still be loading.

    Opens the Responses store and the files database now: StoreError or StorageError (one
    line) if either cannot be.
    """
    settings = settings or ServerSettings()
    store = open_store(settings)
    database = open_database(settings.files_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.batch_runner.resume_all()  # batches a stopped server left unfinished
        yield
        await app.state.batch_runner.close()  # unfinished batches resume at the next start
        await get_runs(app).cancel_all()  # background responses end cancelled
        store.close()
        # the files database stays open: an app may be started again (tests), and SQLite's
        # commits are durable without a close

    app = FastAPI(
        title="hearth", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.registry = registry
    app.state.settings = settings
    app.state.response_store = store
    app.state.metrics = Metrics(lambda: registry.engines, registry.model_slots)
    app.state.files = FileStore(database)
    app.state.batch_runner = runner = BatchRunner(
        app,
        app.state.files,
        BatchStore(database),
        settings.batch_priority,
        settings.batch_max_in_flight,
    )
    app.state.metrics.watch_batches(runner.counts)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.add_middleware(
        RequestGuard,
        registry=registry,
        max_body_bytes=settings.max_body_bytes,
        max_n=settings.max_n,
        request_timeout_s=settings.request_timeout_s,
        max_upload_bytes=settings.max_file_bytes + MULTIPART_SLACK,
    )
    app.add_middleware(RequestCounter, metrics=app.state.metrics)
    app.include_router(models_router)
    app.include_router(chat_router)
    app.include_router(completions_router)
    app.include_router(responses_router)
    app.include_router(messages_router)
    app.include_router(tokenize_router)
    app.include_router(embeddings_router)
    app.include_router(files_router)
    app.include_router(batches_router)
    app.include_router(rerank_router)
    app.include_router(lora_router)
    app.include_router(model_admin_router)
    if settings.ui:
        app.include_router(ui_router)  # the chat page at /

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        body = request.app.state.metrics.render()
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
