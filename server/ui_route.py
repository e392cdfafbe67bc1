"""The chat page: static files from server/ui (shipped in the wheel), served at / and /ui/.

Plain HTML, CSS and JS, no build step and nothing fetched from elsewhere (works offline). The
page talks to the API like any client; with API keys set it asks for one (kept in the browser).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

UI_DIR = Path(__file__).resolve().parent / "ui"
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "markdown.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

router = APIRouter(include_in_schema=False)


def _file(name: str) -> FileResponse:
    return FileResponse(
        UI_DIR / name, media_type=FILES[name], headers={"Cache-Control": "no-cache"}
    )


@router.get("/")
async def index() -> FileResponse:
    return _file("index.html")


def _add(name: str) -> None:
    async def static() -> FileResponse:
        return _file(name)

    router.add_api_route(f"/ui/{name}", static, methods=["GET"], name=f"ui:{name}")


for _name in FILES:
    _add(_name)
