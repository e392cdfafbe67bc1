"""Loading an image-text-to-text checkpoint (LLaVA, Qwen2-VL, ...) with its processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText

from hearth.engine.config import ModelConfig
from hearth.engine.loading import loader
from hearth.engine.loading.sources import Source
from hearth.engine.multimodal.processor import load_processor


def load_vision(
    config: ModelConfig,
    source: Source,
    path: str,
    hf_config: Any,
    torch_dtype: torch.dtype,
    placement: dict[str, Any],
    base_dir: Path | None,
) -> loader.LoadedModel:
    """An image-text-to-text checkpoint with its processor (AutoProcessor, PIL images)."""
    if config.tensor_parallel_size > 1 or config.quantization not in ("auto", "none"):
        raise loader.LoadError(f"{config.id}: vision models run unquantized on one device")
    trust = config.trust_remote_code
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust, **placement
    )
    processor = load_processor(path, trust)
    loaded = loader._loaded(
        config, source, path, hf_config, model, processor.tokenizer, torch_dtype, base_dir
    )
    loaded.processor = processor
    if config.chat_template is not None:  # the processor renders vision prompts
        processor.chat_template = loaded.tokenizer.chat_template
    elif not getattr(loaded.tokenizer, "chat_template", None):  # text-only chats on it too
        loaded.tokenizer.chat_template = getattr(processor, "chat_template", None)
    return loaded
