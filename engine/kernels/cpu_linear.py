"""CPU float32 models: small-batch matmuls through the C++ kernel over packed weight copies.

At decode batch sizes (tens of rows) MKL re-packs each weight on every call, so a step streams
the weights several times; the kernel in kernels/csrc/cpu_kernels.cpp reads a copy packed once
at load ([N/16, K, 16]) a single time per call. `pack_model(model, variant)` picks the kernel
build (kernels/cpu_kernels.py `variants()`; None: the first, the fastest expected). Larger inputs
(prefill chunks) keep MKL on the original weights, which stay in place: the packed copies add
the linear weights' size in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hearth.engine.kernels import cpu_kernels
from hearth.engine.kernels.fusion import set_forward

log = logging.getLogger("hearth.engine")

MAX_ROWS = 256  # above this many rows MKL's GEMM is as fast as the kernel (docs/benchmarks.md)


def _packable(weight: torch.Tensor) -> bool:
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[0] % 16 == 0
    )


def _project(weight: torch.Tensor, bias: torch.Tensor | None, variant: str | None) -> Callable:
    packed = cpu_kernels.pack_weight(weight)  # [N/16, K, 16]
    bias = None if bias is None else bias.detach().contiguous()

    def project(x: torch.Tensor) -> torch.Tensor:  # [.., K] -> [.., N]
        if x.numel() > MAX_ROWS * x.shape[-1] or x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        return cpu_kernels.linear(x, packed, bias, variant)

    return project


def _available_bytes() -> int | None:
    """MemAvailable (free memory plus what the page cache can give back), where Linux says."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@torch.no_grad()
def pack_model(model: nn.Module, variant: str | None = None) -> int:
    """Route the model's float32 CPU linear layers (and fused q/k/v, gate/up groups, see
    kernels/fusion.py) through the kernel build `variant` (a name from cpu_kernels.variants();
    None: the first); returns the bytes the packed copies take (0: none, e.g. when they would
    not fit in half the free memory). The packed layout is the same for every variant."""
    targets: list[tuple[object, torch.Tensor, torch.Tensor | None]] = []  # module or group
    for module in model.modules():
        if type(module) is not nn.Linear or hasattr(module, "_hf_hook"):
            continue
        group = getattr(module, "_hearth_group", None)
        if group is not None:
            targets.append((group, group.weight, group.bias))
        elif not module.__dict__.get("_hearth_forward"):  # fused siblings answer from the group
            targets.append((module, module.weight, module.bias))
    targets = [t for t in targets if _packable(t[1])]
    size = sum(weight.numel() * weight.element_size() for _, weight, _ in targets)
    free = _available_bytes()
    if free is not None and size > free // 2:
        log.warning("not packing %d MiB of linear weights: %d MiB free", size >> 20, free >> 20)
        return 0
    for owner, weight, bias in targets:
        project = _project(weight, bias, variant)
        if isinstance(owner, nn.Module):
            set_forward(owner, project)
        else:
            owner.project = project
    return size
