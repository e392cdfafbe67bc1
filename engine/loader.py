"""Load a checkpoint (local dir, cached hub id, GGUF) onto a device with the right dtype."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from engine import distributed, gguf_weights
from engine.config import ModelConfig
from engine.gguf_cache import converted_checkpoint
from engine.sources import Source

log = logging.getLogger("hearth.loader")

_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


class LoadError(RuntimeError):
    """A model that cannot be loaded; the message is one line for the user."""


@dataclass
class LoadedModel:
    config: ModelConfig
    source: Source
    checkpoint: str  # the directory weights were read from
    model: PreTrainedModel
    tokenizer: Any
    device: torch.device  # where inputs go (the first layer's device under device_map)
    dtype: torch.dtype
    max_model_len: int
    quantization: str = "none"  # in effect: "none", or "gguf" (engine/gguf_weights.py)

    @property
    def devices(self) -> str:
        placed = getattr(self.model, "hf_device_map", None)
        if placed:
            return ",".join(sorted({str(d) for d in placed.values()}))
        return str(self.device)


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"device {requested!r} requested but CUDA is not available")
    return requested


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA (fp16 where bf16 is unsupported), fp32 on CPU (bf16 matmuls are slow)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def hub_snapshot(repo_id: str, revision: str | None) -> str:
    """A hub id from the local cache; downloaded only when online and HF_HUB_OFFLINE is unset."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=_DOWNLOAD_PATTERNS,
            local_files_only=HF_HUB_OFFLINE,
        )
    except Exception as exc:
        how = "not in the local Hugging Face cache" if HF_HUB_OFFLINE else "cannot be downloaded"
        detail = " ".join(str(exc).split())[:200]
        raise LoadError(f"{repo_id}: {how} ({type(exc).__name__}: {detail})") from None


def checkpoint_dir(source: Source, config: ModelConfig, dtype: torch.dtype) -> str:
    if source.kind == "dir":
        return source.location
    if source.kind == "hub":
        return hub_snapshot(source.location, config.revision)
    return str(converted_checkpoint(source.location, str(dtype).removeprefix("torch.")))


def read_chat_template(value: str | None, base_dir: Path | None = None) -> str | None:
    """A chat_template value is inline Jinja, or a path to a template file."""
    if value is None or "{" in value:
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LoadError(f"chat_template: cannot read {path}: {exc.strerror}") from None


def load_model(
    config: ModelConfig,
    source: Source,
    device: str | None = None,
    dtype: str | None = None,
    base_dir: Path | None = None,
) -> LoadedModel:
    """Load weights and tokenizer; `device` / `dtype` override the config when given."""
    if config.quantization == "fp8" or config.load_format != "auto":
        raise LoadError(f"{config.id}: quantization / load_format: not implemented yet")
    device_name = pick_device(device or config.device)
    torch_dtype = pick_dtype(dtype or config.dtype, device_name)
    if refused := gguf_weights.refusal(config.quantization, source.kind, device_name, torch_dtype):
        raise LoadError(f"{config.id}: quantization gguf: {refused}")
    path = checkpoint_dir(source, config, torch_dtype)
    trust = config.trust_remote_code
    placement: dict[str, Any]
    if config.tensor_parallel_size > 1:  # each rank loads its shard (transformers' TP plan)
        if distributed.world_size() != config.tensor_parallel_size:
            raise LoadError(
                f"{config.id}: tensor_parallel_size {config.tensor_parallel_size} needs "
                f"`torchrun --nproc-per-node {config.tensor_parallel_size} -m hearth serve ...` "
                f"(this process group has {distributed.world_size()})"
            )
        placement = {"tp_plan": "auto"}
    elif config.device_map is not None and device_name.startswith("cuda"):
        placement = {"device_map": config.device_map}
    else:
        placement = {"device_map": device_name}
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        if getattr(hf_config.get_text_config(), "attn_logit_softcapping", None):
            raise LoadError(
                f"{config.source}: attention logit softcapping (Gemma 2) is not implemented by "
                "hearth's paged attention"
            )
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise LoadError(f"{config.source}: {type(exc).__name__}: {detail}") from None
    model.eval()
    quantization = "none"
    if source.kind == "gguf" and device_name == "cpu" and torch_dtype == torch.float32:
        try:  # the GGUF file's own blocks for the linear layers (engine/gguf_weights.py)
            quantization = gguf_weights.attach(model, source.location, config.quantization)
        except (gguf_weights.GGUFQuantError, OSError, ValueError) as exc:
            if config.quantization == "gguf":
                raise LoadError(f"{config.id}: quantization gguf: {exc}") from None
            log.warning("%s: quantization auto: float32 weights (%s)", config.id, exc)
    template = read_chat_template(config.chat_template, base_dir)
    if template is not None:
        tokenizer.chat_template = template
    context = getattr(hf_config, "max_position_embeddings", None) or 2048
    max_len = config.max_model_len or context
    if max_len > context:
        log.warning("%s: max_model_len %d exceeds the model's %d", config.id, max_len, context)
    window = sliding_window(hf_config)
    if window is not None and max_len > window:  # within the window, full attention is the same
        log.warning(
            "%s: attention over a sliding window is not implemented: max_model_len %d -> %d "
            "(the model's window)",
            config.id,
            max_len,
            window,
        )
        max_len = window
    first_device = next(model.parameters()).device
    return LoadedModel(
        config, source, path, model, tokenizer, first_device, torch_dtype, max_len, quantization
    )


def sliding_window(hf_config: Any) -> int | None:
    """The window of a model whose attention uses one (Mistral v0.1, Qwen2 with
    use_sliding_window, Gemma's local layers), else None."""
    text = hf_config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None
    types = getattr(text, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def configure_cpu_threads(requested: int | None = None) -> int:
    """Torch intra-op threads: HEARTH_NUM_THREADS, else every CPU this process may use."""
    env = os.environ.get("HEARTH_NUM_THREADS")
    count = requested or (int(env) if env else len(os.sched_getaffinity(0)))
    torch.set_num_threads(max(1, count))
    return torch.get_num_threads()
