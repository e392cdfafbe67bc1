"""Load a checkpoint (local dir, cached hub id, GGUF) onto a device with the right dtype."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
)

from hearth.engine import distributed
from hearth.engine.config import ModelConfig
from hearth.engine.loading import dummy
from hearth.engine.loading.gguf_cache import converted_checkpoint
from hearth.engine.loading.sources import Source
from hearth.engine.quantization import gguf_weights
from hearth.engine.quantization.fp8_checkpoint import load_fp8_model

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
    quantization: str = "none"  # in effect: "none", or "gguf" (engine/quantization/gguf_weights.py)
    processor: Any = None  # image-text-to-text models: the checkpoint's AutoProcessor

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


def hub_snapshot(repo_id: str, revision: str | None, patterns: list[str] | None = None) -> str:
    """A hub id from the local cache; downloaded only when online and HF_HUB_OFFLINE is unset."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns or _DOWNLOAD_PATTERNS,
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
    device_name = pick_device(device or config.device)
    torch_dtype = pick_dtype(dtype or config.dtype, device_name)
    if config.load_format == "dummy":
        return _load_dummy(config, source, device_name, torch_dtype, base_dir)
    if refused := gguf_weights.refusal(config.quantization, source.kind, device_name, torch_dtype):
        raise LoadError(f"{config.id}: quantization gguf: {refused}")
    if config.quantization == "gguf" and config.tensor_parallel_size > 1:
        raise LoadError(f"{config.id}: quantization gguf: not under tensor parallelism")
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
        hf_config = _read_config(config, path)
        if getattr(hf_config, "vision_config", None) is not None:  # image-text-to-text
            from hearth.engine.loading.vision import load_vision

            return load_vision(config, source, path, hf_config, torch_dtype, placement, base_dir)
        model = (
            load_fp8_model(  # None unless fp8 is asked for or shipped (engine/quantization/fp8.py)
                path, hf_config, config.quantization, torch_dtype, placement, trust
            )
            or AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust, **placement
            )
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise LoadError(f"{config.source}: {type(exc).__name__}: {detail}") from None
    return _loaded(config, source, path, hf_config, model, tokenizer, torch_dtype, base_dir)


def _read_config(config: ModelConfig, path: str) -> Any:
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if getattr(hf_config.get_text_config(), "attn_logit_softcapping", None):
        raise LoadError(
            f"{config.source}: attention logit softcapping (Gemma 2) is not implemented by "
            "hearth's paged attention"
        )
    return hf_config


def _load_dummy(
    config: ModelConfig,
    source: Source,
    device_name: str,
    torch_dtype: torch.dtype,
    base_dir: Path | None,
) -> LoadedModel:
    """load_format dummy: config.json and the tokenizer from the checkpoint, random weights
    built on the device (engine/loading/dummy.py); `quantization: fp8` quantizes layer by layer."""
    if source.kind not in ("dir", "hub"):
        raise LoadError(f"{config.id}: load_format dummy needs a checkpoint directory or hub id")
    if config.tensor_parallel_size > 1 or config.device_map is not None:
        raise LoadError(f"{config.id}: load_format dummy builds on one device (no device_map/TP)")
    if config.quantization not in ("auto", "none", "fp8"):
        raise LoadError(f"{config.id}: load_format dummy: quantization {config.quantization}")
    path = source.location
    if source.kind == "hub":  # config and tokenizer files only
        patterns = [p for p in _DOWNLOAD_PATTERNS if p != "*.safetensors"]
        path = hub_snapshot(source.location, config.revision, patterns)
    trust = config.trust_remote_code
    try:
        hf_config = _read_config(config, path)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise LoadError(f"{config.source}: {type(exc).__name__}: {detail}") from None
    try:
        quantize = dummy.fp8_quantizer() if config.quantization == "fp8" else None
        model = dummy.build_dummy_model(hf_config, device_name, torch_dtype, quantize, trust)
    except (RuntimeError, ValueError) as exc:  # no fp8 module, no decoder layers, out of memory
        detail = " ".join(str(exc).split())[:300]
        raise LoadError(f"{config.id}: load_format dummy: {detail}") from None
    return _loaded(config, source, path, hf_config, model, tokenizer, torch_dtype, base_dir)


def _loaded(
    config: ModelConfig,
    source: Source,
    path: str,
    hf_config: Any,
    model: PreTrainedModel,
    tokenizer: Any,
    torch_dtype: torch.dtype,
    base_dir: Path | None,
) -> LoadedModel:
    """The LoadedModel of a built model: chat template, max_model_len, the input device."""
    model.eval()
    quantization = "none"
    on_cpu = next(model.parameters()).device.type == "cpu"
    one_rank = config.tensor_parallel_size == 1  # sharded layers would not match whole blocks
    if source.kind == "gguf" and on_cpu and torch_dtype == torch.float32 and one_rank:
        try:  # the GGUF file's own blocks for the linear layers (quantization/gguf_weights.py)
            quantization = gguf_weights.attach(model, source.location, config.quantization)
        except (gguf_weights.GGUFQuantError, OSError, ValueError) as exc:
            if config.quantization == "gguf":
                raise LoadError(f"{config.id}: quantization gguf: {exc}") from None
            log.warning("%s: quantization auto: float32 weights (%s)", config.id, exc)
    template = read_chat_template(config.chat_template, base_dir)
    if template is not None:
        tokenizer.chat_template = template
    context = getattr(hf_config.get_text_config(), "max_position_embeddings", None) or 2048
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


def cpu_thread_count() -> int:
    """Torch intra-op threads for a CPU model's engine: HEARTH_NUM_THREADS, else every CPU this
    process may use."""
    env = os.environ.get("HEARTH_NUM_THREADS")
    return max(1, int(env) if env else len(os.sched_getaffinity(0)))


def single_threaded() -> None:
    """Torch at one thread on the calling thread (one that loads models): an OpenMP team of its
    own next to the engine thread's would stop libgomp's spin-waits on a small machine (see
    engine/async_engine.py)."""
    torch.set_num_threads(1)


def configure_cpu_threads(requested: int | None = None) -> int:
    """Torch intra-op threads of the calling thread: `requested`, else cpu_thread_count()."""
    torch.set_num_threads(requested or cpu_thread_count())
    return torch.get_num_threads()
