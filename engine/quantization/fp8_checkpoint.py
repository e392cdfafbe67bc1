"""Models with fp8 weights: quantized on the fly, or read from checkpoints that ship fp8.

`quantization: fp8` on a bf16/fp16/fp32 checkpoint: every nn.Linear but lm_head is quantized per
channel (fp8.py) as its weight is read, so a model whose bf16 weights would not fit on the
GPU does in fp8. `auto` (or `fp8`) on a checkpoint that ships fp8 weights reads them as they are.

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
the `compressed-tensors` package; hearth's Fp8Linear (quantization/fp8.py) serves both everywhere.
The model is built with its parameters on the meta device (buffers such as RoPE's inv_freq are
computed as usual), then every tensor is read from the safetensors files straight to the device:
memory is the fp8 model's, never the bf16 one's.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hearth.engine.quantization.fp8 import (
    FP8,
    Fp8Linear,
    fast_path,
    quantize_model,
    quantize_weight,
    skipped,
)

log = logging.getLogger("hearth.fp8")


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
    """The safetensors files of a checkpoint: its index's shards, model.safetensors, else all
    (a repo may also hold e.g. Mistral's consolidated.safetensors, under other names)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path}: no *.safetensors files (fp8 loading reads safetensors)")
    return files


class NameMismatch(ValueError):
    """The checkpoint's tensor names are not the model's (a renamed or converted layout)."""


def load_streamed(
    path: str,
    hf_config: Any,
    fmt: Fp8Format | None,
    dtype: torch.dtype,
    device: str,
    trust: bool,
    skip: tuple[str, ...] = ("lm_head",),
) -> nn.Module:
    """Build the model of `hf_config` with its parameters on the meta device, then read the
    tensors of `path`'s safetensors files one at a time to `device`: with `fmt`, Fp8Linear
    layers wherever the checkpoint has fp8 weights and scales; without, every nn.Linear (but
    `skip`) quantized per channel as it is read. Other tensors are cast to `dtype`. Peak memory:
    the fp8 model plus one layer. NameMismatch when a parameter has no tensor, ValueError when
    a tensor has the wrong dtype or shape."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig

    plain = copy.deepcopy(hf_config)
    if hasattr(plain, "quantization_config"):
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
        weight_name, bias_name = f"{name}.weight", f"{name}.bias"
        scale_name = f"{name}.{fmt.scale_name}" if fmt else None
        shape = (linear.out_features, linear.in_features)
        if weight_name not in where or (fmt and scale_name not in where) or skipped(name, skip):
            continue  # left unquantized (lm_head, ignored layers, tied): read below
        weight = read(weight_name)
        if tuple(weight.shape) != shape or (fmt is not None) != (weight.dtype == FP8):
            raise ValueError(f"{weight_name}: {weight.dtype} {list(weight.shape)}, want {shape}")
        bias = read(bias_name).to(targets, dtype) if bias_name in where else None
        if fmt is None:
            q, scale = quantize_weight(weight.to(targets))
            layer = Fp8Linear(q, scale, bias)
        else:
            scale = read(scale_name).float()
            if fmt.block_size is None and scale.numel() not in (1, linear.out_features):
                raise ValueError(f"{scale_name}: shape {list(scale.shape)} is not per channel")
            layer = Fp8Linear(weight.to(targets), scale.to(targets), bias, fmt.block_size)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        done.update(n for n in (weight_name, scale_name, bias_name) if n in where)
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
        raise NameMismatch(f"no tensor for {', '.join(missing[:3])} in {path}")
    model.to(targets)  # the buffers (RoPE tables) follow the parameters
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    if targets.type == "cuda" and fast_path(targets):
        for layer in model.modules():  # block scales: per channel for the fp8 matmuls
            if isinstance(layer, Fp8Linear):
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
    ships fp8 under quantization auto or fp8, or any checkpoint under fp8 (its linear layers but
    lm_head quantized as they are read; a checkpoint whose names are not the model's is loaded
    by transformers first, then quantized in place). ValueError with one line otherwise."""
    fmt = checkpoint_format(hf_config)
    if fmt is None and quantization != "fp8":
        return None
    if fmt is not None and quantization == "none":
        raise ValueError("the checkpoint ships fp8 weights: use quantization auto or fp8")
    device = placement.get("device_map")
    if not isinstance(device, str) or device == "auto":
        raise ValueError("fp8 weights are served on one device (no device_map / tensor parallel)")
    if fmt is not None:
        return load_streamed(path, hf_config, fmt, dtype, device, trust)
    try:
        return load_streamed(path, hf_config, None, dtype, device, trust)
    except NameMismatch as exc:
        log.info("fp8: %s; loading with transformers, then quantizing", exc)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust, **placement
    )
    quantize_model(model)
    return model
