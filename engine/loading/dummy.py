"""`load_format: dummy`: a model of a checkpoint's config.json with random weights, built on the
target device layer by layer (vLLM's --load-format dummy).

The model is first built on the meta device (no memory), then each decoder layer gets real
tensors on the device, filled in place (normal with std = config.initializer_range, norms 1,
biases 0) and, under `quantization: fp8`, quantized at once by quantization.fp8.quantize_model,
so that the peak stays near the final size: one bf16 layer above it. The rest (embeddings, final
norm, lm_head: never quantized) follows, then the rotary tables are computed again. No weight
goes through the CPU on a GPU: a Llama-70B shape builds in seconds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

log = logging.getLogger("hearth.loader")

Quantize = Callable[[nn.Module], int]  # replaces the layer's linears in place, returns bytes


def decoder_layers(model: nn.Module, num_layers: int) -> nn.ModuleList | None:
    """The ModuleList of the model's decoder layers (the first list of num_layers modules)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    return None


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return "Norm" in name or isinstance(module, nn.LayerNorm | nn.GroupNorm)


@torch.no_grad()
def _fill(
    tensor: torch.Tensor, module: nn.Module, name: str, std: float, gen: torch.Generator
) -> None:
    """In place: matrices (linear, embedding) ~ N(0, std); norm weights 1; biases and the rest 0."""
    if tensor.dim() >= 2:
        tensor.normal_(0.0, std, generator=gen)
    elif _is_norm(module) and name == "weight":
        tensor.fill_(1.0)
    else:
        tensor.zero_()


def _rotary_buffers(module: nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The buffers of a fresh copy of a rotary-embedding module (inv_freq and the like), computed
    from its config on `device`; None when the module cannot be rebuilt that way."""
    config = getattr(module, "config", None)
    if config is None:
        return None
    try:
        with torch.device(device):
            fresh = type(module)(config)
    except Exception:  # a constructor of another signature: the caller reports the buffers
        return None
    for attr in ("attention_scaling", "rope_type", "max_seq_len_cached", "original_max_seq_len"):
        if hasattr(fresh, attr):
            setattr(module, attr, getattr(fresh, attr))
    return {name: buf.to(device) for name, buf in fresh.named_buffers(recurse=False)}


@torch.no_grad()
def materialise(
    modules: Iterable[nn.Module],
    device: torch.device,
    std: float,
    gen: torch.Generator,
    done: dict[int, nn.Parameter],
) -> list[str]:
    """Give every meta parameter and buffer of `modules` (and their children) a filled tensor
    on `device`. `done` maps id(meta parameter) to its new parameter, so that a parameter shared
    by two modules (tied embeddings) stays shared. Returns the names of buffers that could not
    be computed (left zero)."""
    unknown: list[str] = []
    for root in modules:
        for module in root.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in done:
                    tensor = torch.empty(param.shape, dtype=param.dtype, device=device)
                    _fill(tensor, module, name, std, gen)
                    done[id(param)] = nn.Parameter(tensor, requires_grad=False)
                module._parameters[name] = done[id(param)]
            metas = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
            if not metas:
                continue
            fresh = _rotary_buffers(module, device) if "inv_freq" in metas else None
            for name in metas:
                buf = module._buffers[name]
                if fresh is not None and name in fresh:
                    module._buffers[name] = fresh[name].to(buf.dtype)
                else:
                    module._buffers[name] = torch.zeros(buf.shape, dtype=buf.dtype, device=device)
                    unknown.append(f"{type(module).__name__}.{name}")
    return unknown


def _meta_model(hf_config: PretrainedConfig, dtype: torch.dtype, trust: bool) -> PreTrainedModel:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=trust)


def build_dummy_model(
    hf_config: PretrainedConfig,
    device: str | torch.device,
    dtype: torch.dtype,
    quantize: Quantize | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
) -> PreTrainedModel:
    """The model of `hf_config` with random weights on `device` in `dtype`; with `quantize`,
    each decoder layer is passed to it right after it is filled (embeddings and lm_head are
    not). The model is in eval mode; its parameters need no grad."""
    started = time.perf_counter()
    device = torch.device(device)
    model = _meta_model(hf_config, dtype, trust_remote_code)
    text = hf_config.get_text_config()
    std = float(getattr(text, "initializer_range", None) or 0.02)
    gen = torch.Generator(device=device).manual_seed(seed)
    layers = decoder_layers(model, text.num_hidden_layers)
    if quantize is not None and layers is None:
        raise ValueError(f"no list of {text.num_hidden_layers} decoder layers to quantize")
    done: dict[int, nn.Parameter] = {}
    unknown: list[str] = []
    quantized = 0
    for layer in layers if layers is not None else []:
        unknown += materialise([layer], device, std, gen, done)
        if quantize is not None:
            quantized += quantize(layer)
            if device.type == "cuda":  # hand the layer's bf16 blocks to the next layer
                torch.cuda.empty_cache()
    unknown += materialise([model], device, std, gen, done)  # embeddings, norm, lm_head, rotary
    if unknown:
        log.warning("dummy weights: buffers left zero (no known init): %s", sorted(set(unknown)))
    model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the KV budget counts reserved-but-free blocks as used
    size = model_bytes(model)
    log.info(
        "dummy weights: %s, %.2f GiB on %s in %.1f s%s",
        type(model).__name__,
        size / 2**30,
        device,
        time.perf_counter() - started,
        f" (decoder layers fp8: {quantized / 2**30:.2f} GiB)" if quantize is not None else "",
    )
    return model


def _tensors(model: nn.Module) -> Iterable[torch.Tensor]:
    """Every parameter and buffer once (tied ones counted once)."""
    seen: set[int] = set()
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (what a batch-1 decode step reads)."""
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def fp8_quantizer() -> Quantize:
    """engine.quantization.fp8.quantize_model, imported when first needed."""
    try:
        from hearth.engine.quantization.fp8 import quantize_model
    except ImportError as exc:
        raise RuntimeError(f"quantization fp8 is not available: {exc}") from None

    def quantize(layer: nn.Module) -> int:
        return int(quantize_model(layer))

    return quantize
