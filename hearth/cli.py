"""The `hearth` command: `hearth serve` loads models.yaml's models and serves the OpenAI API."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from pydantic import ByteSize, TypeAdapter, ValidationError

from hearth import __version__
from hearth.engine.config import (
    ConfigError,
    HearthConfig,
    ModelConfig,
    load_config,
    resolve_sources,
)
from hearth.engine.loading.sources import Source, looks_like_hub_id
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings

log = logging.getLogger("hearth")

_STARTED = time.monotonic()


class Server(uvicorn.Server):
    """On the first SIGINT/SIGTERM the registry turns to draining: /health and new requests get
    503 (the port stays open), requests in flight may finish for `drain_timeout` seconds, then
    the rest are ended with an error and hearth exits 0 (uvicorn would re-raise the signal). A
    second signal stops at once.
    """

    abort_grace = 3.0  # seconds for aborted requests to send their error and close

    def __init__(
        self, config: uvicorn.Config, registry: ModelRegistry, drain_timeout: float = 30.0
    ) -> None:
        super().__init__(config)
        self.registry = registry
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None
        self.aborted = False

    def handle_exit(self, sig: int, frame: object) -> None:
        if self.drain_deadline is None and not self.should_exit:
            self.registry.state = "draining"
            self.drain_deadline = time.monotonic() + self.drain_timeout
            log.info(
                "draining: %d request(s) in flight, up to %g s (signal again to stop now)",
                self.registry.in_flight,
                self.drain_timeout,
            )
        else:
            self.registry.state = "draining"
            super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()

    def drain_step(self) -> None:
        """Called every tick while draining: exit when idle, abort what is left at the deadline."""
        if self.drain_deadline is None or self.should_exit:
            return
        now = time.monotonic()
        if self.registry.in_flight == 0:
            self.should_exit = True
        elif not self.aborted and now >= self.drain_deadline:
            log.warning("drain timeout: ending %d request(s)", self.registry.in_flight)
            for engine in self.registry.engines:
                engine.fail_all("the server is shutting down")
            self.aborted = True
        elif self.aborted and now >= self.drain_deadline + self.abort_grace:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        self.drain_step()
        return await super().on_tick(counter)


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


def byte_size(text: str) -> int:
    """'4MiB', '512kB' or a plain number of bytes (argparse type)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4MiB)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hearth",
        description="Self-hosted, OpenAI-compatible inference server for Hugging Face checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"hearth {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve models over the OpenAI API",
        description="Load the models of a models.yaml (or one --model) and serve the OpenAI API "
        "(/v1/chat/completions, /v1/models, /health) at http://HOST:PORT/v1.",
    )
    serve.add_argument(
        "--config",
        default="models.yaml",
        metavar="PATH",
        help="models file to serve (default: ./models.yaml)",
    )
    serve.add_argument(
        "--model",
        metavar="ID_OR_SOURCE",
        help="serve one model: an id or alias from the config, or a checkpoint "
        "directory, a hub id from the local Hugging Face cache, or a .gguf file",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1; 0.0.0.0 for all interfaces)",
    )
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument(
        "--api-key",
        action="append",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (repeatable; also env "
        "HEARTH_API_KEY, comma-separated)",
    )
    serve.add_argument(
        "--api-key-file", metavar="PATH", help="file with one accepted API key per line"
    )
    serve.add_argument(
        "--device", metavar="DEVICE", help="override every model's device: auto, cpu, cuda, cuda:N"
    )
    serve.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="override every model's dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    serve.add_argument(
        "--quantization",
        choices=["auto", "none", "fp8", "gguf"],
        help="override every model's quantization (auto: what the checkpoint ships)",
    )
    serve.add_argument(
        "--load-format",
        choices=["auto", "dummy"],
        help="dummy: random weights from the checkpoint's config (benchmarks)",
    )
    serve.add_argument(
        "--autotune",
        choices=["auto", "off", "remeasure"],
        help="override every model's autotune: time the kernel choices on this machine at "
        "first start (auto, cached), again (remeasure), or not at all (off)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser requests from ORIGIN (repeatable; default: none)",
    )
    serve.add_argument(
        "--responses-max-stored",
        type=int,
        default=1000,
        metavar="N",
        help="Responses API: stored responses kept for previous_response_id and GET "
        "(default: 1000)",
    )
    serve.add_argument(
        "--responses-ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="Responses API: how long a stored response is kept (default: 3600)",
    )
    serve.add_argument(
        "--max-body-size",
        type=byte_size,
        default=4 << 20,
        metavar="BYTES",
        help="larger request bodies get 413 before they are read (default: 4MiB)",
    )
    serve.add_argument(
        "--max-n",
        type=int,
        default=16,
        metavar="N",
        help="most samples (n) a request may ask for per prompt (default: 16)",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="abort a request after this long, queueing included; 0 disables (default: 600)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may finish before they are ended "
        "(default: 30)",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        metavar="FRACTION",
        help="override every model's engine.gpu_memory_utilization: the share of GPU memory "
        "for weights plus KV cache (default 0.9; a model that nearly fills the GPU needs more)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        metavar="N",
        help="override every model's engine.max_waiting: queued requests before 429",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    return parser


@dataclass
class Selection:
    models: list[ModelConfig]
    sources: dict[str, Source]
    base_dir: Path


def _id_for_source(source: str) -> str:
    if looks_like_hub_id(source) and not Path(source).exists():
        return source
    path = Path(source.rstrip("/"))
    return path.stem if path.suffix == ".gguf" else path.name


def select_models(args: argparse.Namespace) -> Selection:
    """The models to serve after --config / --model / --device / --dtype; ConfigError if bad."""
    config_path = Path(args.config)
    explicit_config = args.config != "models.yaml"
    models: list[ModelConfig] = []
    base_dir = Path.cwd()
    name = str(config_path)
    if config_path.exists() or explicit_config or args.model is None:
        config = load_config(config_path)
        models = list(config.models)
        base_dir = config_path.resolve().parent
    if args.model:
        chosen = [m for m in models if args.model in m.names]
        if chosen:
            models = chosen
        else:
            models = [ModelConfig(id=_id_for_source(args.model), source=args.model)]
            name = "--model"
            base_dir = Path.cwd()
    overrides = {
        key: value
        for key, value in (
            ("device", args.device),
            ("dtype", args.dtype),
            ("quantization", args.quantization),
            ("load_format", args.load_format),
        )
        if value
    }
    engine = {
        key: value
        for key, value in (
            ("max_waiting", args.max_waiting),
            ("autotune", args.autotune),
            ("gpu_memory_utilization", args.gpu_memory_utilization),
        )
        if value is not None
    }
    if overrides or engine:
        try:
            models = [_override(m, overrides, engine) for m in models]
        except ValidationError as exc:
            raise ConfigError(f"--device/--dtype/...: {exc.errors()[0]['msg']}") from None
    return Selection(models, resolve_sources(HearthConfig(models=models), name, base_dir), base_dir)


def _override(model: ModelConfig, overrides: dict, engine: dict) -> ModelConfig:
    data = {**model.model_dump(), **overrides}
    data["engine"] = {**data["engine"], **engine}
    return ModelConfig.model_validate(data)


def api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("HEARTH_API_KEY", "").split(",") if k.strip()]
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file: {exc.strerror}: {args.api_key_file}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return tuple(dict.fromkeys(keys))


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        selection = select_models(args)
        keys = api_keys(args)
    except ConfigError as exc:
        print(f"hearth: error: {exc}", file=sys.stderr)
        return 2

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: tensor parallelism
        rank = _join_tensor_parallel(selection)
        if rank < 0:
            return 2
        if rank > 0:
            return _follow(selection)

    warning = bind_warning(args.host, keys)
    if warning:
        log.warning("%s\n%s\n%s", "!" * 80, warning, "!" * 80)
    registry = ModelRegistry()
    settings = ServerSettings(
        api_keys=keys,
        cors_origins=tuple(args.cors_origin),
        responses_max_stored=args.responses_max_stored,
        responses_ttl_s=args.responses_ttl,
        max_body_bytes=args.max_body_size,
        max_n=args.max_n,
        request_timeout_s=args.request_timeout or None,
    )
    app = create_app(registry, settings)
    server = Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.log_level == "debug",
            log_config=None,
            timeout_graceful_shutdown=5,  # after the drain, only closing is left
        ),
        registry,
        drain_timeout=args.drain_timeout,
    )
    outcome = {"code": 0}
    base_url = f"http://{'localhost' if is_loopback(args.host) else args.host}:{args.port}/v1"
    loader = threading.Thread(
        target=_load_all,
        args=(selection, registry, server, outcome, base_url),
        name="hearth-loader",
        daemon=True,
    )
    loader.start()
    try:
        server.run()
    finally:
        registry.state = "draining"
        for engine in registry.engines:
            engine.shutdown()
    return outcome["code"]


def _join_tensor_parallel(selection: Selection) -> int:
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


def _follow(selection: Selection) -> int:
    """A tensor-parallel rank other than 0: load this rank's shard and run rank 0's steps."""
    from hearth.engine.async_engine import follow
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


def _load_all(
    selection: Selection, registry: ModelRegistry, server: Server, outcome: dict, base_url: str
) -> None:
    """Load every model (progress bar), register it, then log one ready line per model."""
    try:
        from tqdm import tqdm

        from hearth.engine.async_engine import build_engine
        from hearth.engine.loading.loader import (
            LoadError,
            cpu_thread_count,
            load_model,
            single_threaded,
        )

        tqdm.monitor_interval = 0  # progress bars: no monitor thread left waking up while serving
        single_threaded()  # the engine threads alone run torch multi-threaded
        for config in tqdm(
            selection.models, desc="Loading models", unit="model", disable=len(selection.models) < 2
        ):
            loaded = load_model(config, selection.sources[config.id], base_dir=selection.base_dir)
            if loaded.device.type == "cpu":
                log.info("CPU: %d torch threads, %s", cpu_thread_count(), str(loaded.dtype)[6:])
            registry.add(build_engine(loaded))
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
            len(registry.engines),
            base_url,
            time.monotonic() - _STARTED,
        )
    except (LoadError, MemoryError) as exc:
        log.error("%s", exc)
        outcome["code"] = 1
        server.should_exit = True
    except Exception:
        log.exception("loading failed")
        outcome["code"] = 1
        server.should_exit = True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    parser.print_help()
    return 0
