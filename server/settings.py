"""Server-wide settings that are not per-model (auth, CORS, the Responses store, limits, drain).

The one source of their defaults: `hearth serve`'s flags read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    responses_max_stored: int = 1000  # stored responses kept for previous_response_id / GET
    responses_ttl_s: float = 3600.0  # and for how long
    # where they are kept: ":memory:" (lost on restart), a SQLite file path or sqlite:/// URL.
    # `hearth serve` defaults to a file in the data dir (hearth.paths.default_responses_db);
    # apps built in-process (tests) keep them in memory unless told otherwise.
    responses_db: str = ":memory:"
    max_body_bytes: int = 4 << 20  # larger request bodies get 413 before they are parsed
    # Files and Batch APIs (server/files, server/batches): where files and the batch database
    # are kept (":memory:": a temporary folder; `hearth serve` defaults to the data dir,
    # hearth.paths.default_files_dir), the largest upload, the priority batch lines run at
    # (engine/scheduler.py: lower first; live requests default to 0) and how many lines of all
    # batches may be in the engines at once (the rest of the engine is left to live requests)
    files_dir: str = ":memory:"
    max_file_bytes: int = 200 << 20
    batch_priority: int = 100
    batch_max_in_flight: int = 8
    max_n: int = 16  # samples per prompt
    request_timeout_s: float | None = 600.0  # then the request is aborted (504 / error event)
    # background responses (server/responses/background.py): each one's own deadline (None:
    # none; they outlive their HTTP request, so request_timeout_s does not apply) and how
    # many may run at once (more get 429)
    background_timeout_s: float | None = 1800.0
    max_background_runs: int = 32
    drain_timeout_s: float = 30.0  # on SIGTERM, how long requests in flight may finish
    # images for vision models (server/images.py): `data:` URLs always, https only when allowed
    allow_image_urls: bool = False
    image_url_timeout_s: float = 10.0  # fetching one https image, in total
    max_images_per_request: int = 8
    max_image_bytes: int = 8 << 20  # one image's encoded file
    max_image_pixels: int = 4096 * 4096  # one image's width * height
    allow_runtime_lora: bool = False  # POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    ui: bool = True  # the chat page at / (server/ui); `hearth serve --no-ui` turns it off
