"""Models with fp8 weights: quantized on the fly, or read from checkpoints that ship fp8.

Formats read (the scale multiplies: W ~= q * scale in both):
- compressed-tensors "float-quantized" (llm-compressor's FP8 / FP8-dynamic / FP8_BLOCK schemes,
  e.g. RedHatAI/*-FP8-dynamic): config.json quantization_config {"quant_method":
  "compressed-tensors", "format": "float-quantized", "config_groups": {..: {"weights":
  {"num_bits": 8, "type": "float", "strategy": "channel" | "tensor" | "block",
  "block_structure": [128, 128]}, "input_activations": ..}}, "ignore": [..]}; tensors
  `<layer>.weight` float8_e4m3fn [N, K] and `<layer>.weight_scale` [N, 1] (channel), [1] or []
  (tensor) or [ceil(N/128), ceil(K/128)] (block), in bf16/fp16/fp32; static schemes also ship
  `<layer>.input_scale`, unused here (activations are quantized per token, dynamically).
- transformers' fine-grained FP8 (DeepSeek V3 style, `FineGrainedFP8Config`): {"quant_method":
  "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}; tensors
  `<layer>.weight` float8_e4m3fn [N, K] and `<layer>.weight_scale_inv` float32
  [ceil(N/128), ceil(K/128)] (a scalar when weight_block_size is null), despite the name
  multiplied in (transformers' `_dequantize_fp8_weight`).

Why not transformers' own quantizers: its fine-grained FP8 layer needs the `kernels` package and a
kernel downloaded from the hub on GPUs (and dequantizes to bf16 on CPU), compressed-tensors needs
the `compressed-tensors` package; hearth's Fp8Linear (engine/fp8.py) serves both everywhere.
The model is built with its parameters on the meta device (buffers such as RoPE's inv_freq are
computed as usual), then every tensor is read from the safetensors files straight to the device:
memory is the fp8 model's, never the bf16 one's.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.fp8 import FP8, Fp8Linear, fast_path, quantize_model


@dataclass(frozen=True)
class Fp8Format:
    method: str  # "compressed-tensors" or "fp8"
    scale_name: str  # the scale tensor's suffix: "weight_scale" or "weight_scale_inv"
    block_size: tuple[int, int] | None  # None: per channel (or per tensor, expanded)


def _as_dict(qc: Any) -> dict:
    return qc if isinstance(qc, dict) else qc.to_dict()


def checkpoint_format(hf_config: Any) -> Fp8Format | None:
    """The fp8 format of a checkpoint's config.json, None when it ships no fp8 weights (or
    another quantization, left to transformers). ValueError for an fp8 variant not served."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = _as_dict(qc)
    method = qc.get("quant_method")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if qc.get("scale_fmt", "float") not in ("float", None):
            raise ValueError(f"fp8 checkpoint: scale_fmt {qc['scale_fmt']!r} is not supported")
        return Fp8Format("fp8", "weight_scale_inv", tuple(block) if block else None)
    if method != "compressed-tensors":
        return None
    groups = list((qc.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if not weights or not all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights):
        return None  # int8 / int4 compressed-tensors: not fp8
    if qc.get("format") not in ("float-quantized", "naive-quantized", None):
        raise ValueError(f"compressed-tensors fp8: format {qc.get('format')!r} is not supported")
    strategies = {w.get("strategy", "tensor") for w in weights}
    if strategies <= {"channel", "tensor"}:
        return Fp8Format("compressed-tensors", "weight_scale", None)
    if strategies == {"block"}:
        blocks = {tuple(w.get("block_structure") or (128, 128)) for w in weights}
        if len(blocks) == 1:
            return Fp8Format("compressed-tensors", "weight_scale", blocks.pop())
    raise ValueError(f"compressed-tensors fp8: weight strategies {sorted(strategies)} unsupported")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (allocated and moved one
    at a time, so nothing weight-sized stays), buffers where they are made (accelerate's
    init_empty_weights(include_buffers=False), without the dependency)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _tensor_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: an fp8 checkpoint needs *.safetensors files")
    return files


def load_prequantized(
    path: str, hf_config: Any, fmt: Fp8Format, dtype: torch.dtype, device: str, trust: bool
) -> nn.Module:
    """Build the model of `hf_config` with Fp8Linear layers wherever the checkpoint has fp8
    weights, reading the tensors from `path`'s safetensors files to `device` (other tensors
    cast to `dtype`). ValueError when names or shapes do not match the model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig

    plain = copy.deepcopy(hf_config)
    del plain.quantization_config
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(plain, dtype=dtype, trust_remote_code=trust)
    files = _tensor_files(Path(path))
    handles = {f: safe_open(str(f), framework="pt", device="cpu") for f in files}
    where = {name: f for f, h in handles.items() for name in list(h.keys())}  # tensor -> file

    def read(name: str) -> torch.Tensor:
        return handles[where[name]].get_tensor(name)

    targets = torch.device(device)
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    done: set[str] = set()
    for name, linear in linears.items():
        weight_name, scale_name = f"{name}.weight", f"{name}.{fmt.scale_name}"
        if scale_name not in where:
            continue  # left unquantized (lm_head, ignored layers): read below
        q = read(weight_name)
        if q.dtype != FP8 or tuple(q.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{weight_name}: {q.dtype} {list(q.shape)}, not fp8 e4m3 [N, K]")
        scale = read(scale_name).float()
        if fmt.block_size is None and scale.numel() not in (1, linear.out_features):
            raise ValueError(f"{scale_name}: shape {list(scale.shape)} is not per channel")
        bias = read(f"{name}.bias").to(targets, dtype) if f"{name}.bias" in where else None
        layer = Fp8Linear(q.to(targets), scale.to(targets), bias, fmt.block_size)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        done.update(n for n in (weight_name, scale_name, f"{name}.bias") if n in where)
    expected = dict(model.named_parameters())
    rest = {}
    for name in where.keys() - done:
        if name in expected and expected[name].device.type == "meta":
            rest[name] = read(name).to(targets, dtype)
    model.load_state_dict(rest, strict=False, assign=True)
    if getattr(plain.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"fp8 checkpoint: no tensor for {', '.join(missing[:3])}")
    model.to(targets)  # the buffers (RoPE tables) follow the parameters
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    if targets.type == "cuda":
        fast_path(targets)
        for layer in model.modules():  # block scales: per channel for the fp8 matmuls
            if isinstance(layer, Fp8Linear) and fast_path(targets):
                layer.per_channel()
    return model


def load_fp8_model(
    path: str,
    hf_config: Any,
    quantization: str,
    dtype: torch.dtype,
    placement: dict[str, Any],
    trust: bool,
) -> nn.Module | None:
    """The model when fp8 is involved, else None (the loader's ordinary path): a checkpoint that
    ships fp8 under quantization auto or fp8, or any checkpoint under fp8 (loaded, then its
    linear layers but lm_head quantized in place). ValueError with one line otherwise."""
    fmt = checkpoint_format(hf_config)
    if fmt is None and quantization != "fp8":
        return None
    if fmt is not None and quantization == "none":
        raise ValueError("the checkpoint ships fp8 weights: use quantization auto or fp8")
    device = placement.get("device_map")
    if not isinstance(device, str) or device == "auto":
        raise ValueError("fp8 weights are served on one device (no device_map / tensor parallel)")
    if fmt is not None:
        return load_prequantized(path, hf_config, fmt, dtype, device, trust)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust, **placement
    )
    quantize_model(model)
    return model
