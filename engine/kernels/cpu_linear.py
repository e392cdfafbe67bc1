"""CPU float32 models: small-batch matmuls through the C++ kernel over packed weight copies.

At decode batch sizes (tens of rows) MKL re-packs each weight on every call, so a step streams
the weights several times; the kernel in kernels/csrc/cpu_kernels.cpp reads a copy packed once
at load ([N/16, K, 16]) a single time per call. `pack_model(model, variant)` picks the kernel
build (kernels/cpu_kernels.py `variants()`; None: the first, the fastest expected).

Larger inputs (prefill chunks): while autotune compares candidates, MKL on the original weights,
which stay beside the packed copies. Once the choice is final (`pack_model(..., final=True)`),
the kernel and MKL are timed on this host at prefill rows (`kernel_keeps_up`); where the kernel
keeps up, it serves every row count and the original float32 weights are dropped, so each
weight is held once, packed (a weight tied to the input embeddings stays: the lookup reads
it). The originals are rebuilt from the packed copies (an exact relayout) whenever forwards
are restored (kernels/fusion.py `restore_forwards`, e.g. for a re-measure).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hearth.engine.host_memory import file_mappings
from hearth.engine.kernels import cpu_kernels
from hearth.engine.kernels.fusion import set_forward, set_weight

log = logging.getLogger("hearth.engine")

MAX_ROWS = 256  # above this many rows MKL's GEMM is as fast as the kernel (docs/benchmarks.md)
PREFILL_ROWS = 512  # rows of the timing that decides whether the kernel serves prefill too
KEEP_UP = 1.15  # the kernel serves prefill when its best time is within 15% of MKL's


def _packable(weight: torch.Tensor) -> bool:
    return (
        weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dim() == 2
        and weight.shape[0] % 16 == 0
    )


def _project(
    weight: torch.Tensor | None,
    packed: torch.Tensor,
    bias: torch.Tensor | None,
    variant: str | None,
) -> Callable:
    """The forward over `packed` ([N/16, K, 16]); above MAX_ROWS rows MKL over `weight` [N, K],
    or the kernel for every row count when `weight` is None (the originals dropped)."""
    bias = None if bias is None else bias.detach().contiguous()

    def project(x: torch.Tensor) -> torch.Tensor:  # [.., K] -> [.., N]
        if weight is not None and (x.numel() > MAX_ROWS * x.shape[-1] or x.dtype != torch.float32):
            return F.linear(x, weight, bias)
        if x.dtype != torch.float32:
            return cpu_kernels.linear(x.float(), packed, bias, variant).to(x.dtype)
        return cpu_kernels.linear(x, packed, bias, variant)

    return project


def unpack_weight(packed: torch.Tensor) -> torch.Tensor:
    """The [N, K] weight of a packed [N/16, K, 16] one (exact: a relayout)."""
    chunks, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(chunks * 16, k).contiguous()  # [N, K]


def kernel_keeps_up(weight: torch.Tensor, packed: torch.Tensor, variant: str | None) -> bool:
    """Whether the kernel over `packed` runs PREFILL_ROWS rows about as fast as MKL over `weight`
    [N, K] on this host: 7 interleaved timings of each, the fastest of each compared (another
    program's work only adds time, so the minimum is the figure noise disturbs least)."""
    x = torch.randn(PREFILL_ROWS, weight.shape[1])  # [M, K]
    calls = {
        "MKL": lambda: F.linear(x, weight),
        "kernel": lambda: cpu_kernels.linear(x, packed, None, variant),
    }
    best = dict.fromkeys(calls, float("inf"))
    for call in calls.values():  # warm up both
        call()
    for _ in range(7):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    keeps_up = best["kernel"] <= KEEP_UP * best["MKL"]
    log.info(
        "prefill matmul (%d rows): CPU kernel %.2f ms, MKL %.2f ms: %s",
        PREFILL_ROWS,
        1e3 * best["kernel"],
        1e3 * best["MKL"],
        "the kernel serves prefill too" if keeps_up else "prefill stays on MKL",
    )
    return keeps_up


def _available_bytes() -> int | None:
    """MemAvailable (free memory plus what the page cache can give back), where Linux says."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _tied(model: nn.Module) -> set[int]:
    """Storage addresses of the input embeddings' weights (a tied lm_head shares one)."""
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return {m.weight.untyped_storage().data_ptr() for m in embeddings}


@torch.no_grad()
def pack_model(model: nn.Module, variant: str | None = None, final: bool = False) -> int:
    """Route the model's float32 CPU linear layers (and fused q/k/v, gate/up groups, see
    kernels/fusion.py) through the kernel build `variant` (a name from cpu_kernels.variants();
    None: the first); returns the bytes the packed copies take (0: none, e.g. when they would
    not fit in half the free memory). The packed layout is the same for every variant.
    `final`: the kernel choice is made; where the kernel keeps up with MKL at prefill rows
    (timed here), drop the original weights (module docstring)."""
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
    packs = [cpu_kernels.pack_weight(weight) for _, weight, _ in targets]  # [N/16, K, 16] each
    tied = _tied(model) if final else set()
    loose = [i for i, t in enumerate(targets) if t[1].untyped_storage().data_ptr() not in tied]
    drop = False
    if final and loose:  # timed on the median-sized weight (not the vocabulary-wide lm_head)
        index = sorted(loose, key=lambda i: targets[i][1].numel())[len(loose) // 2]
        drop = kernel_keeps_up(targets[index][1], packs[index], variant)
    dropped = 0
    for (owner, weight, bias), packed in zip(targets, packs, strict=True):
        alone = drop and weight.untyped_storage().data_ptr() not in tied
        project = _project(None if alone else weight, packed, bias, variant)
        if isinstance(owner, nn.Module):
            set_forward(owner, project)
        else:
            owner.project = project
        if alone:  # the packed copy is the weight now; restore_forwards rebuilds the original
            # [N, K] over one NaN: any path that still read it would fail loudly, not silently
            stand_in = weight.new_full((), float("nan")).expand(weight.shape)
            set_weight(owner, stand_in, lambda p=packed: unpack_weight(p))
            dropped += weight.numel() * weight.element_size()
    if dropped:
        moved = _leave_file_mappings(model)
        log.info(
            "%d MiB of float32 originals dropped (%d MiB of the rest copied out of the "
            "checkpoint's mapping, which is released)",
            dropped >> 20,
            moved >> 20,
        )
    return size


def _leave_file_mappings(model: nn.Module) -> int:
    """Copy the parameters that still live in a memory-mapped checkpoint (safetensors loads
    map the file) into the process's own memory: the dropped weights' pages stay resident as
    long as any tensor holds the mapping. Returns the bytes copied."""
    ranges = file_mappings()
    moved = 0
    for param in model.parameters():
        address = param.untyped_storage().data_ptr()
        if any(param.stride()) and any(start <= address < end for start, end in ranges):
            param.data = param.data.clone()
            moved += param.numel() * param.element_size()
    return moved
