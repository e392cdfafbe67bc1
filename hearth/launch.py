"""What `hearth serve` runs once its flags are read: pick the models, then serve them.

Under torchrun (tensor parallelism) every process joins the group first; rank 0 serves and the
others follow its steps. Serving starts the HTTP server at once (503 while loading) and loads the
models, building one engine each, in a background thread. torch is imported only to load.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from hearth.engine.config import (
    ConfigError,
    HearthConfig,
    LoraConfig,
    ModelConfig,
    load_config,
    resolve_sources,
)
from hearth.engine.loading.sources import Source, looks_like_hub_id
from hearth.engine.types import EngineClient, InvalidRequestError
from hearth.lora_select import absolute, select_loras
from hearth.on_demand import parse_budget_flags
from hearth.server.app import create_app
from hearth.server.files.db import StorageError
from hearth.server.lifecycle import DrainingServer
from hearth.server.model_manager import ModelManager
from hearth.server.registry import ModelRegistry
from hearth.server.responses.store import StoreError
from hearth.server.settings import ServerSettings

log = logging.getLogger("hearth")

STARTED = time.monotonic()  # for "ready N s after start"
DEFAULT_CONFIG = "models.yaml"  # read when present; another path must exist
# Without ./models.yaml (e.g. after `pip install`, in any folder): the repository's models.yaml,
# shipped in the package (hearth/models.yaml links to it), so `hearth serve` serves its default.
PACKAGED_CONFIG = Path(__file__).resolve().parent / "models.yaml"


@dataclass
class Selection:
    """The models to serve, where each one's weights come from, and the dir paths resolve in."""

    models: list[ModelConfig]
    sources: dict[str, Source]
    base_dir: Path
    loras: list[tuple[LoraConfig, str]] = field(default_factory=list)  # (adapter, base id)
    allow_runtime_lora: bool = False  # models.yaml's allow_runtime_lora
    memory_budget: dict[str, int] = field(default_factory=dict)  # device -> bytes (on_demand.py)


def select_models(
    config: str = DEFAULT_CONFIG,
    model: str | None = None,
    overrides: dict[str, Any] | None = None,
    engine_overrides: dict[str, Any] | None = None,
    lora_flags: list[str] | None = None,
    budget_flags: list[str] | None = None,
) -> Selection:
    """The models of `config`, or the one `model` names (an id or alias there, else a source),
    with `overrides` (ModelConfig fields) and `engine_overrides` (EngineSettings fields) applied
    to every one, and the LoRA adapters of the config (those of served models) and of
    `lora_flags` ("ID=PATH"), and the memory budgets of the config and of `budget_flags`
    ("DEVICE=SIZE"); ConfigError if anything is invalid."""
    config_path = Path(config)
    explicit_config = config != DEFAULT_CONFIG
    if not explicit_config and not config_path.exists() and PACKAGED_CONFIG.exists():
        if model is None:
            log.info("no %s here: serving hearth's default models (%s)", config, PACKAGED_CONFIG)
        config_path = PACKAGED_CONFIG  # `--model smollm2` still finds its id or alias there
    models: list[ModelConfig] = []
    base_dir = Path.cwd()
    name = str(config_path)
    config_loras: list[LoraConfig] = []
    runtime_lora = False
    budget: dict[str, int] = {}
    if config_path.exists() or explicit_config or model is None:
        loaded = load_config(config_path)
        budget = {device: int(size) for device, size in loaded.memory_budget.items()}
        models = list(loaded.models)
        base_dir = config_path.resolve().parent
        config_loras = [absolute(a, base_dir) for a in loaded.loras]
        runtime_lora = loaded.allow_runtime_lora
    if model:
        chosen = [m for m in models if model in m.names]
        if chosen:
            models = chosen
        else:
            models = [ModelConfig(id=_id_for_source(model), source=model)]
            name = "--model"
            base_dir = Path.cwd()
    overrides, engine_overrides = overrides or {}, engine_overrides or {}
    if overrides or engine_overrides:
        try:
            models = [_override(m, overrides, engine_overrides) for m in models]
        except ValidationError as exc:
            raise ConfigError(f"--device/--dtype/...: {exc.errors()[0]['msg']}") from None
    sources = resolve_sources(HearthConfig(models=models), name, base_dir)
    loras = select_loras(models, config_loras, lora_flags or [], name)
    budget |= parse_budget_flags(budget_flags or [])
    return Selection(models, sources, base_dir, loras, runtime_lora, budget)


def _id_for_source(source: str) -> str:
    if looks_like_hub_id(source) and not Path(source).exists():
        return source
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def _override(model: ModelConfig, overrides: dict, engine_overrides: dict) -> ModelConfig:
    data = {**model.model_dump(), **overrides}
    data["engine"] = {**data["engine"], **engine_overrides}
    return ModelConfig.model_validate(data)


def read_api_keys(keys: list[str], key_file: str | None) -> tuple[str, ...]:
    """The accepted keys: `keys`, then env HEARTH_API_KEY (comma-separated), then `key_file`'s
    lines (blank lines and # comments skipped), without repeats; ConfigError if unreadable."""
    keys = list(keys)
    keys += [k.strip() for k in os.environ.get("HEARTH_API_KEY", "").split(",") if k.strip()]
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file: {exc.strerror}: {key_file}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def bind_warning(host: str, keys: tuple[str, ...]) -> str | None:
    """The warning for serving a non-loopback address without an API key, else None."""
    if keys or is_loopback(host):
        return None
    return (
        f"SECURITY WARNING: binding {host} without an API key: anyone who can reach this port "
        "can use the models. Set --api-key (or HEARTH_API_KEY), or bind 127.0.0.1."
    )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(
    selection: Selection, settings: ServerSettings, host: str, port: int, log_level: str
) -> int:
    """Serve the selection until stopped; the exit code (2: torchrun misfit or the Responses
    store cannot be opened, 1: loading failed)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: tensor parallelism
        rank = join_tensor_parallel(selection)
        if rank < 0:
            return 2
        if rank > 0:
            return follow_rank0(selection)

    warning = bind_warning(host, settings.api_keys)
    if warning:
        log.warning("%s\n%s\n%s", "!" * 80, warning, "!" * 80)
    registry = ModelRegistry()
    try:
        app = create_app(registry, settings)
    except (StoreError, StorageError) as exc:  # corrupt, locked, unwritable: never start
        print(f"hearth: error: {exc}", file=sys.stderr)
        return 2
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            access_log=log_level == "debug",
            log_config=None,
            timeout_graceful_shutdown=5,  # after the drain, only closing is left
        ),
        registry,
        drain_timeout=settings.drain_timeout_s,
    )
    base_url = f"http://{'localhost' if is_loopback(host) else host}:{port}/v1"
    loader = ModelLoader(selection, registry, server, base_url)
    loader.start()
    server.serve_until_stopped()
    return loader.exit_code


def join_tensor_parallel(selection: Selection) -> int:
    """Join torchrun's process group; this rank, or -1 when the config does not fit it."""
    from hearth.engine import distributed

    world = distributed.init_from_env()
    sizes = [config.tensor_parallel_size for config in selection.models]
    if sizes != [world]:
        print(
            f"hearth: error: under torchrun ({world} processes) serve exactly one model with "
            f"tensor_parallel_size: {world} (got {sizes})",
            file=sys.stderr,
        )
        return -1
    return distributed.rank()


def follow_rank0(selection: Selection) -> int:
    """A tensor-parallel rank other than 0: load this rank's shard and run rank 0's steps."""
    from hearth.engine.builder import follow
    from hearth.engine.loading.loader import configure_cpu_threads, load_model

    # torchrun passes SIGTERM/SIGINT to every rank: only rank 0 acts on them (it drains, then
    # its close() ends this loop); a follower that left early would stall rank 0's collectives.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    [config] = selection.models
    loaded = load_model(config, selection.sources[config.id], base_dir=selection.base_dir)
    if loaded.device.type == "cpu":
        configure_cpu_threads()
    follow(loaded)
    return 0


class ModelLoader(threading.Thread):
    """Plans every model (server/model_manager.py), loads those loaded at start (progress bar),
    registers their engines, then logs one line per model; models loaded on demand load on
    their first request. If loading at start fails: logs why, sets `exit_code` to 1 and stops
    the server."""

    def __init__(
        self, selection: Selection, registry: ModelRegistry, server: DrainingServer, base_url: str
    ) -> None:
        super().__init__(name="hearth-loader", daemon=True)
        self.selection = selection
        self.registry = registry
        self.server = server
        self.base_url = base_url
        self.exit_code = 0

    def run(self) -> None:
        selection, registry = self.selection, self.registry
        try:
            from tqdm import tqdm

            from hearth.engine.loading.loader import LoadError

            tqdm.monitor_interval = 0  # progress bars: no monitor thread left waking up
            manager = self._manager()
            at_start = [c for c in selection.models if not manager.slots[c.id].plan.on_demand]
            for config in tqdm(
                at_start, desc="Loading models", unit="model", disable=len(at_start) < 2
            ):
                started = time.monotonic()
                engine = self._load(config.id)
                manager.loaded(engine, time.monotonic() - started)
            self._load_loras()
            registry.mark_ready()
            for engine in registry.engines:
                info = engine.info
                log.info(
                    "ready: %s (source %s) on %s, %s, KV capacity %d tokens, max_model_len %d",
                    info.model_id,
                    info.source,
                    info.device,
                    info.dtype,
                    info.kv_capacity_tokens,
                    info.max_model_len,
                )
            log.info(
                "serving %d model(s) at %s (ready %.1f s after start)",
                len(selection.models),
                self.base_url,
                time.monotonic() - STARTED,
            )
        except (LoadError, MemoryError, InvalidRequestError) as exc:  # adapters: AdapterError
            log.error("%s", exc)
            self._failed()
        except Exception:
            log.exception("loading failed")
            self._failed()

    def _manager(self) -> ModelManager:
        """The models' plans and budgets (hearth/on_demand.py), handed to the registry."""
        from hearth.on_demand import build_manager

        selection = self.selection
        pinned = {base for _, base in selection.loras}
        if selection.allow_runtime_lora:  # adapters may be loaded into any generation model
            pinned |= {c.id for c in selection.models if c.task == "generate"}
        manager = build_manager(
            selection.models, selection.sources, selection.memory_budget, pinned, self._load
        )
        self.registry.manage(manager)
        return manager

    def _load(self, model_id: str) -> EngineClient:
        from hearth.on_demand import load_engine

        config = next(c for c in self.selection.models if c.id == model_id)
        source = self.selection.sources[model_id]
        return load_engine(config, source, self.selection.base_dir)

    def _load_loras(self) -> None:
        """Load the selection's LoRA adapters into their base engines and serve each under its
        own id; an adapter that cannot be served raises AdapterError (one line, naming it)."""
        from hearth.server.lora_route import LoraView

        for lora, base_id in self.selection.loras:
            engine = next(e for e in self.registry.engines if e.info.model_id == base_id)
            engine.core.loras.load(lora.id, lora.source)
            self.registry.add_adapter(LoraView(engine, lora.id, lora.source))
            log.info("LoRA adapter %s (source %s) on %s", lora.id, lora.source, base_id)

    def _failed(self) -> None:
        self.exit_code = 1
        self.server.stop()
