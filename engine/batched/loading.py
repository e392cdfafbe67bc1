"""What loading an embedding or rerank model shares: the checks, the device and dtype, the
checkpoint folder, one-line load errors, the context length and the served model's ModelInfo."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import LoadError, checkpoint_dir, pick_device, pick_dtype
from hearth.engine.loading.sources import Source
from hearth.engine.types import ModelInfo


def open_checkpoint(config: ModelConfig, source: Source) -> tuple[torch.device, torch.dtype, Path]:
    """The device, dtype and checkpoint folder of a `task: embed | rerank` model (an embedder's
    GGUF file: its cached conversion, engine/loading/gguf_cache.py); LoadError for what such
    models do not support (GGUF rerankers, tensor parallelism, dummy weights, quantization)."""
    task = config.task
    if source.kind not in ("dir", "hub", "gguf") or (source.kind == "gguf" and task != "embed"):
        raise LoadError(f"{config.id}: task {task} needs a checkpoint directory or hub id")
    if config.tensor_parallel_size > 1 or config.load_format != "auto":
        raise LoadError(f"{config.id}: task {task}: one device, real weights only")
    if config.quantization not in ("auto", "none"):
        raise LoadError(f"{config.id}: task {task}: quantization {config.quantization}")
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    return device, dtype, Path(checkpoint_dir(source, config, dtype))


def load_error(config: ModelConfig, exc: Exception) -> LoadError:
    """A transformers loading failure as one line naming the source."""
    detail = " ".join(str(exc).split())[:300]
    return LoadError(f"{config.source}: {type(exc).__name__}: {detail}")


def context_length(hf_config: Any) -> int:
    """The positions the checkpoint's model takes (512 when its config does not say)."""
    return getattr(hf_config, "max_position_embeddings", None) or 512


def model_info(
    config: ModelConfig, max_len: int, device: torch.device, dtype: torch.dtype
) -> ModelInfo:
    return ModelInfo(
        model_id=config.id,
        source=config.source,
        max_model_len=max_len,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        kv_capacity_tokens=0,
        created=int(time.time()),
        aliases=list(config.aliases),
        task=config.task,
    )
