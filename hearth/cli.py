"""The `hearth` command: `hearth serve` loads models.yaml's models and serves the OpenAI API.

This module reads the flags and hands over to hearth.launch; the flags' defaults come from where
the settings are defined (ServerSettings, engine.config's models). Longer than 350 lines: one
`add_argument` per flag, with its help text, is most of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any, get_args

from pydantic import BaseModel, ByteSize, TypeAdapter, ValidationError

from hearth import __version__, launch
from hearth.engine.config import ConfigError, EngineSettings, ModelConfig
from hearth.on_demand import add_on_demand_flags
from hearth.paths import default_files_dir, default_responses_db
from hearth.server.settings import ServerSettings


def _setting(name: str) -> Any:
    """ServerSettings' default for `name`."""
    [field] = [f for f in dataclasses.fields(ServerSettings) if f.name == name]
    return field.default


def _engine_default(name: str) -> Any:
    return EngineSettings.model_fields[name].default


def _choices(model: type[BaseModel], name: str) -> list[str]:
    """The values a Literal field of a config model accepts."""
    return list(get_args(model.model_fields[name].annotation))


def _size_text(size: int) -> str:
    """4194304 -> '4MiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


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
        default=launch.DEFAULT_CONFIG,
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
        choices=_choices(ModelConfig, "dtype"),
        help="override every model's dtype (auto: bf16 on CUDA, fp32 on CPU)",
    )
    serve.add_argument(
        "--quantization",
        choices=_choices(ModelConfig, "quantization"),
        help="override every model's quantization (auto: what the checkpoint ships)",
    )
    serve.add_argument(
        "--load-format",
        choices=_choices(ModelConfig, "load_format"),
        help="dummy: random weights from the checkpoint's config (benchmarks)",
    )
    serve.add_argument(
        "--autotune",
        choices=_choices(EngineSettings, "autotune"),
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
        default=_setting("responses_max_stored"),
        metavar="N",
        help="Responses API: stored responses kept for previous_response_id and GET "
        f"(default: {_setting('responses_max_stored')})",
    )
    serve.add_argument(
        "--responses-ttl",
        type=float,
        default=_setting("responses_ttl_s"),
        metavar="SECONDS",
        help="Responses API: how long a stored response is kept "
        f"(default: {_setting('responses_ttl_s'):g})",
    )
    serve.add_argument(
        "--responses-db",
        default=default_responses_db(),
        metavar="PATH",
        help="Responses API: where stored responses are kept, a SQLite file (or sqlite:///PATH; "
        "':memory:': not kept across restarts) (default: responses.sqlite3 in hearth's data "
        "dir, $HEARTH_DATA_DIR)",
    )
    serve.add_argument(
        "--files-dir",
        default=default_files_dir(),
        metavar="PATH",
        help="Files and Batch APIs: where uploaded files, batch outputs and the batch database "
        "are kept (':memory:': a temporary folder) (default: files/ in hearth's data dir, "
        "$HEARTH_DATA_DIR)",
    )
    serve.add_argument(
        "--max-file-size",
        type=byte_size,
        default=_setting("max_file_bytes"),
        metavar="BYTES",
        help=f"Files API: the largest upload (default: {_size_text(_setting('max_file_bytes'))})",
    )
    serve.add_argument(
        "--batch-priority",
        type=int,
        default=_setting("batch_priority"),
        metavar="N",
        help="Batch API: the scheduling priority of batch lines (lower runs first; live "
        f"requests default to 0) (default: {_setting('batch_priority')})",
    )
    serve.add_argument(
        "--batch-max-in-flight",
        type=int,
        default=_setting("batch_max_in_flight"),
        metavar="N",
        help="Batch API: lines of all batches in the engines at once "
        f"(default: {_setting('batch_max_in_flight')})",
    )
    serve.add_argument(
        "--max-body-size",
        type=byte_size,
        default=_setting("max_body_bytes"),
        metavar="BYTES",
        help="larger request bodies get 413 before they are read "
        f"(default: {_size_text(_setting('max_body_bytes'))})",
    )
    serve.add_argument(
        "--allow-image-urls",
        action="store_true",
        help="vision models: fetch https image URLs (data: URLs are always read; default: off)",
    )
    serve.add_argument(
        "--max-images-per-request",
        type=int,
        default=_setting("max_images_per_request"),
        metavar="N",
        help=f"vision models: images per request (default: {_setting('max_images_per_request')})",
    )
    serve.add_argument(
        "--max-image-size",
        type=byte_size,
        default=_setting("max_image_bytes"),
        metavar="BYTES",
        help="vision models: one image's encoded bytes "
        f"(default: {_size_text(_setting('max_image_bytes'))})",
    )
    serve.add_argument(
        "--max-image-pixels",
        type=int,
        default=_setting("max_image_pixels"),
        metavar="N",
        help=f"vision models: one image's width * height (default: {_setting('max_image_pixels')})",
    )
    serve.add_argument(
        "--max-n",
        type=int,
        default=_setting("max_n"),
        metavar="N",
        help=f"most samples (n) a request may ask for per prompt (default: {_setting('max_n')})",
    )
    serve.add_argument(
        "--request-timeout",
        type=float,
        default=_setting("request_timeout_s"),
        metavar="SECONDS",
        help="abort a request after this long, queueing included; 0 disables "
        f"(default: {_setting('request_timeout_s'):g})",
    )
    serve.add_argument(
        "--drain-timeout",
        type=float,
        default=_setting("drain_timeout_s"),
        metavar="SECONDS",
        help="on SIGTERM, how long requests in flight may finish before they are ended "
        f"(default: {_setting('drain_timeout_s'):g})",
    )
    serve.add_argument(
        "--gpu-memory-utilization",
        type=float,
        metavar="FRACTION",
        help="override every model's engine.gpu_memory_utilization: the share of GPU memory "
        f"for weights plus KV cache (default {_engine_default('gpu_memory_utilization')}; a model "
        "that nearly fills the GPU needs more)",
    )
    serve.add_argument(
        "--max-waiting",
        type=int,
        metavar="N",
        help="override every model's engine.max_waiting: queued requests before 429",
    )
    serve.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="ID=PATH",
        help="serve a PEFT LoRA adapter (a directory, or a hub id in the local cache) as model "
        "ID on the served generation model (repeatable; also models.yaml's loras)",
    )
    serve.add_argument(
        "--allow-runtime-lora",
        action="store_true",
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's)",
    )
    serve.add_argument(
        "--max-loras",
        type=int,
        metavar="N",
        help="override every model's engine.max_loras: adapters on the device at once "
        f"(default {_engine_default('max_loras')})",
    )
    serve.add_argument(
        "--max-lora-rank",
        type=int,
        metavar="R",
        help="override every model's engine.max_lora_rank "
        f"(default {_engine_default('max_lora_rank')})",
    )
    add_on_demand_flags(serve)
    serve.add_argument(
        "--no-ui",
        dest="ui",
        action="store_false",
        default=_setting("ui"),
        help="do not serve the chat page at / (default: served)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default: info",
    )
    return parser


def select_models(args: argparse.Namespace) -> launch.Selection:
    """The models to serve after --config / --model / --device / --dtype; ConfigError if bad."""
    overrides = {
        key: value
        for key, value in (
            ("device", args.device),
            ("dtype", args.dtype),
            ("quantization", args.quantization),
            ("load_format", args.load_format),
            ("load", getattr(args, "load", None)),
            ("keep_alive", getattr(args, "keep_alive", None)),
        )
        if value
    }
    engine_overrides = {
        key: value
        for key, value in (
            ("max_waiting", args.max_waiting),
            ("autotune", args.autotune),
            ("gpu_memory_utilization", args.gpu_memory_utilization),
            ("max_loras", args.max_loras),
            ("max_lora_rank", args.max_lora_rank),
        )
        if value is not None
    }
    loras, budgets = getattr(args, "lora", []), getattr(args, "memory_budget", [])
    models, config = args.model, args.config
    return launch.select_models(config, models, overrides, engine_overrides, loras, budgets)


def server_settings(
    args: argparse.Namespace, api_keys: tuple[str, ...], runtime_lora: bool = False
) -> ServerSettings:
    """The server's settings from the flags (`runtime_lora`: models.yaml allows it too)."""
    return ServerSettings(
        api_keys=api_keys,
        cors_origins=tuple(args.cors_origin),
        responses_max_stored=args.responses_max_stored,
        responses_ttl_s=args.responses_ttl,
        responses_db=getattr(args, "responses_db", ":memory:"),
        max_body_bytes=args.max_body_size,
        files_dir=getattr(args, "files_dir", ":memory:"),
        max_file_bytes=args.max_file_size,
        batch_priority=args.batch_priority,
        batch_max_in_flight=args.batch_max_in_flight,
        max_n=args.max_n,
        request_timeout_s=args.request_timeout or None,
        drain_timeout_s=args.drain_timeout,
        allow_image_urls=args.allow_image_urls,
        max_images_per_request=args.max_images_per_request,
        max_image_bytes=args.max_image_size,
        max_image_pixels=args.max_image_pixels,
        allow_runtime_lora=getattr(args, "allow_runtime_lora", False) or runtime_lora,
        ui=getattr(args, "ui", True),
    )


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
        api_keys = launch.read_api_keys(args.api_key or [], args.api_key_file)
    except ConfigError as exc:
        print(f"hearth: error: {exc}", file=sys.stderr)
        return 2
    settings = server_settings(args, api_keys, selection.allow_runtime_lora)
    return launch.serve(selection, settings, args.host, args.port, args.log_level)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    parser.print_help()
    return 0
