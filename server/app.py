"""The FastAPI app factory: routes, error envelope, auth settings, CORS."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from hearth import __version__
from server.errors import install_error_handlers
from server.registry import ModelRegistry
from server.routes import chat, models
from server.settings import ServerSettings


def create_app(registry: ModelRegistry, settings: ServerSettings | None = None) -> FastAPI:
    """Build the app over a registry of engines; the registry may still be loading."""
    settings = settings or ServerSettings()
    app = FastAPI(title="hearth", version=__version__, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.settings = settings
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    app.include_router(models.router)
    app.include_router(chat.router)
    return app
