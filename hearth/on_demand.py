"""The launcher's side of models loaded on demand (server/model_manager.py holds the policy):

- `plan_models`: each configured model's load mode, keep_alive, device and estimated bytes;
- `memory_budgets`: bytes per device (models.yaml's `memory_budget`, --memory-budget, else 90%
  of host RAM / of each GPU);
- `estimate_bytes`: what a model will allocate, before loading it: weights (the checkpoint's
  files, scaled to the dtype it loads in; twice on CPU where the C++ matmul packs a copy), the KV
  cache (`kv_cache_memory`; 1 GiB on CPU; on a GPU without it, `gpu_memory_utilization` of the
  device, weights included: the engine fills that much) and workspace (a step's logits and
  activations). A model's `memory:` key replaces the estimate;
- `load_engine` / `free_engine`: build a model's engine; stop it and give its memory back
  (tensors dropped, gc, `torch.cuda.empty_cache`, glibc's `malloc_trim` for host RSS).

torch is imported only where a model is loaded, freed, or a GPU measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hearth.engine.config import ConfigError, HearthConfig, ModelConfig
from hearth.engine.host_memory import trim_host_memory
from hearth.engine.loading.sources import Source, SourceError, resolve_source
from hearth.engine.types import EngineClient
from hearth.server.model_manager import ModelManager, ModelPlan

log = logging.getLogger("hearth.models")

GIB = 1 << 30
ON_DEMAND_KEEP_ALIVE_S = 300.0  # Ollama's 5 minutes
BUDGET_FRACTION = 0.9  # of host RAM / a GPU's memory when no budget is set
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def add_on_demand_flags(serve: argparse.ArgumentParser) -> None:
    """`hearth serve`'s --load, --keep-alive (every model's) and --memory-budget flags."""
    serve.add_argument(
        "--load",
        choices=["at_start", "on_demand"],
        help="override every model's load: at_start, or on_demand (on its first request); "
        "default: at_start for one model, on_demand for several",
    )
    serve.add_argument(
        "--keep-alive",
        metavar="DURATION",
        help="override every model's keep_alive: idle time before it is unloaded (seconds, "
        "30s, 5m, 1h; -1: never; 0: right after its last request); default: -1 for models "
        "loaded at start, 5m on demand",
    )
    serve.add_argument(
        "--memory-budget",
        action="append",
        default=[],
        metavar="DEVICE=SIZE",
        help="bytes loaded models may take on a device (cpu=16GiB, cuda:0=70GiB; repeat per "
        "device): a model that does not fit evicts the least recently used idle one; "
        "default: 90%% of host RAM / of each GPU",
    )


def device_of(config: ModelConfig) -> str:
    """The device whose budget a model counts against: cpu or cuda:N."""
    device = config.device
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    return "cuda:0" if device == "cuda" else device


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_total(device: str) -> int:
    """Bytes of host RAM (cpu) or of the GPU."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def memory_budgets(devices: set[str], configured: dict[str, int]) -> dict[str, int | None]:
    """Each device's budget: the configured bytes, else BUDGET_FRACTION of the device."""
    return {d: configured.get(d) or int(device_total(d) * BUDGET_FRACTION) for d in devices}


def _checkpoint_dir(source: Source) -> Path | None:
    """The folder of a dir source, or of a hub id's newest snapshot in the local cache."""
    if source.kind == "dir":
        return Path(source.location)
    if source.kind == "hub":
        from huggingface_hub.constants import HF_HUB_CACHE

        folder = Path(HF_HUB_CACHE) / f"models--{source.location.replace('/', '--')}"
        snapshots = sorted((folder / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        return snapshots[-1] if snapshots else None
    return None


def _hf_config(folder: Path | None) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}


def estimate_bytes(config: ModelConfig, source: Source, device: str) -> int:
    """Bytes the model will take on `device` once loaded (see the module doc)."""
    if config.memory is not None:
        return int(config.memory)
    hf = _hf_config(_checkpoint_dir(source))
    hf = {**hf.get("text_config", {}), **hf}
    weights = _weight_bytes(config, source, device, hf) + _draft_weights(config, device)
    settings = config.engine
    if config.task in ("embed", "rerank"):  # no KV cache
        kv = 0
    elif device == "cpu":
        kv = int(settings.kv_cache_memory or GIB)
    elif settings.kv_cache_memory is not None:
        kv = int(settings.kv_cache_memory)
    else:  # the engine fills gpu_memory_utilization of the device, weights included
        kv = max(0, int(device_total(device) * settings.gpu_memory_utilization) - weights)
    tokens = settings.max_num_batched_tokens
    hidden, vocab = int(hf.get("hidden_size", 4096)), int(hf.get("vocab_size", 32000))
    workspace = tokens * 4 * (vocab + 16 * hidden) + 64 * (1 << 20)  # logits, activations
    return weights + kv + workspace


def _weight_bytes(config: ModelConfig, source: Source, device: str, hf: dict[str, Any]) -> int:
    """The weights in memory (on CPU with the packed matmul's copies)."""
    on_cpu = device == "cpu"
    if source.kind == "gguf":  # blocks kept on CPU, embeddings dequantized: a rough bound
        weights = Path(source.location).stat().st_size * (3 if on_cpu else 4)
    else:
        folder = _checkpoint_dir(source)
        files = [f for p in _WEIGHT_FILES for f in folder.rglob(p)] if folder else []
        weights = sum(f.stat().st_size for f in files)
        stored = _DTYPE_BYTES.get(str(hf.get("torch_dtype") or hf.get("dtype") or "float32"), 4)
        target = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
        weights = weights * _DTYPE_BYTES[target] // stored
    if on_cpu and config.task == "generate" and config.engine.cpu_matmul is not False:
        weights *= 2  # packed copies of the linear weights
    return weights


def _draft_weights(config: ModelConfig, device: str) -> int:
    """A speculative draft model's weights (its KV cache shares the target's budget); 0 when
    there is none or its source is not found yet (a hub id not in the cache)."""
    spec = config.speculative
    if spec is None or spec.draft is None:
        return 0
    try:
        source = resolve_source(spec.draft)
        hf = _hf_config(_checkpoint_dir(source))
        return _weight_bytes(config, source, device, {**hf.get("text_config", {}), **hf})
    except (SourceError, OSError, ValueError):
        return 0


def plan_models(
    models: list[ModelConfig], sources: dict[str, Source], pinned: set[str]
) -> list[ModelPlan]:
    """Each model's plan. Default load: at_start for one model, on_demand for several; `pinned`
    models (LoRA bases, tensor parallelism) load at start and stay."""
    plans = []
    for config in models:
        keep_pinned = config.id in pinned or config.tensor_parallel_size > 1
        default = "at_start" if len(models) == 1 else "on_demand"
        on_demand = (config.load or default) == "on_demand" and not keep_pinned
        keep = config.keep_alive
        if keep is None:
            keep = ON_DEMAND_KEEP_ALIVE_S if on_demand else -1.0
        device = device_of(config)
        plans.append(
            ModelPlan(
                model_id=config.id,
                device=device,
                estimate_bytes=estimate_bytes(config, sources[config.id], device),
                on_demand=on_demand,
                keep_alive_s=None if keep < 0 or keep_pinned else keep,
                task=config.task,
                aliases=tuple(config.aliases),
                max_model_len=config.max_model_len,
                pinned=keep_pinned,
            )
        )
    return plans


def parse_budget_flags(flags: list[str]) -> dict[str, int]:
    """--memory-budget DEVICE=SIZE (cpu=8GiB, cuda:0=20GiB) as bytes per device."""
    budgets = {}
    for flag in flags:
        device, _, size = flag.partition("=")
        try:
            budgets.update(
                HearthConfig.model_validate(
                    {"models": [{"id": "x", "source": "x"}], "memory_budget": {device: size}}
                ).memory_budget
            )
        except ValidationError as exc:
            message = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ConfigError(f"--memory-budget {flag}: {message}") from None
    return {device: int(size) for device, size in budgets.items()}


def build_manager(
    models: list[ModelConfig],
    sources: dict[str, Source],
    budget: dict[str, int],
    pinned: set[str],
    load: Callable[[str], EngineClient],
) -> ModelManager:
    """The manager of these models (their plans, each device's budget); warns when the models
    loaded at start already exceed a budget, and logs each model loaded on demand."""
    plans = plan_models(models, sources, pinned)
    budgets = memory_budgets({p.device for p in plans}, budget)
    for device, limit in budgets.items():
        at_start = sum(p.estimate_bytes for p in plans if p.device == device and not p.on_demand)
        if limit is not None and at_start > limit:
            log.warning(
                "%s: the models loaded at start need about %.2f GiB, over its budget (%.2f GiB)",
                device,
                at_start / GIB,
                limit / GIB,
            )
    for plan in plans:
        if plan.on_demand:
            keep = "never" if plan.keep_alive_s is None else f"{plan.keep_alive_s:g}s"
            log.info(
                "on demand: %s (%s, about %.2f GiB, keep_alive %s)",
                plan.model_id,
                plan.device,
                plan.estimate_bytes / GIB,
                keep,
            )
    return ModelManager(plans, budgets, load, free_engine)


def load_engine(config: ModelConfig, source: Source, base_dir: Path) -> EngineClient:
    """Load a model and start its engine (LoadError, MemoryError, InvalidRequestError)."""
    from hearth.engine.builder import build_engine
    from hearth.engine.loading.loader import cpu_thread_count, load_model, single_threaded

    single_threaded()  # the engine threads alone run torch multi-threaded
    if config.task == "embed":  # no KV cache, no generation (engine/embedding/)
        from hearth.engine.embedding.loader import build_embedding_engine

        return build_embedding_engine(config, source, base_dir)
    if config.task == "rerank":  # cross-encoders and decoder rerankers (engine/rerank/)
        from hearth.engine.rerank.loader import build_rerank_engine

        return build_rerank_engine(config, source, base_dir)
    from hearth.engine.spec_decode.build import load_draft

    loaded = load_model(config, source, base_dir=base_dir)
    if loaded.device.type == "cpu":
        log.info("CPU: %d torch threads, %s", cpu_thread_count(), str(loaded.dtype)[6:])
    return build_engine(loaded, load_draft(config, base_dir))


def free_engine(engine: EngineClient) -> None:
    """Stop the engine thread and give its memory back: every reference the engine object
    holds is dropped (it keeps its `info` only), then gc, the CUDA caching allocator's cache,
    and glibc's free lists (malloc_trim: host RSS shrinks)."""
    import torch

    engine.shutdown()
    for name in [n for n in vars(engine) if n != "info"]:
        delattr(engine, name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_host_memory()
