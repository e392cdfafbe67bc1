"""Route a GGUF-quantized model's linear layers through the block kernels at small batches.

quantization/gguf_weights.py hangs each nn.Linear's GGUF blocks on it (`_hearth_blocks`); after
kernels/fusion.py has fused q/k/v and gate/up (and kernels/cpu_linear.py may have packed float32
copies), this gives every layer and fused group a forward that reads the blocks for inputs of up
to MAX_ROWS rows (batch-1 and small decode steps) and otherwise calls the forward it had before:
the packed float32 kernel up to its own limit, MKL over the float32 weights above (prefill).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hearth.engine.kernels import gguf_kernels
from hearth.engine.kernels.fusion import GROUPS, set_forward
from hearth.engine.kernels.gguf_kernels import BlockWeight

# Up to this many rows the block kernel is the fastest: it streams ~5x fewer bytes than float32
# but dequantizes each block once per register tile of rows (4 on avx512, 2 on avx2; a partial
# tile's rows go one by one), so its time grows with the passes over the weights. Measured on a
# 2-vCPU Zen 4, SmolLM2-135M's 30 layers + lm_head streamed, one thread, ms for the whole set:
# 1 row 14.6 (packed float32 41, MKL 68); 4 rows 21 (57, 113); 8 rows 41 (31, 76); 16 rows 82
# (52, 99); 32 rows 152 (92, 146). Above it the layer's previous forward runs
# (engine/kernels/cpu_linear.py's packed kernel up to its own limit, then MKL).
MAX_ROWS = 4


def concat(parts: list[BlockWeight]) -> BlockWeight:
    """One weight of the parts' rows in order (a fused q/k/v or gate/up); same kind and k."""
    first = parts[0]
    if any(p.kind != first.kind or p.k != first.k for p in parts):
        raise ValueError("cannot fuse blocks of different kinds or widths")
    qs = torch.cat([p.qs for p in parts])  # [sum n, k/32 * bytes]
    scales = torch.cat([p.scales for p in parts])
    return BlockWeight(first.kind, qs, scales, sum(p.n for p in parts), first.k)


def _project(blocks: BlockWeight, bias: torch.Tensor | None, before: Callable) -> Callable:
    kernel = gguf_kernels.bind(blocks, bias)

    def project(x: torch.Tensor) -> torch.Tensor:  # [.., K] -> [.., N]
        if x.numel() > MAX_ROWS * x.shape[-1] or x.dtype != torch.float32:
            return before(x)
        return kernel(x)

    return project


@torch.no_grad()
def route_model(model: nn.Module) -> int:
    """Give every linear layer (or fused group) with blocks the block-kernel forward; returns
    the bytes of the blocks routed."""
    size = 0
    grouped: set[int] = set()
    for parent in model.modules():
        for names in GROUPS:
            layers = [getattr(parent, name, None) for name in names]
            group = getattr(layers[0], "_hearth_group", None)
            if group is None or any(not hasattr(m, "_hearth_blocks") for m in layers):
                continue
            # cached with the fused group: engine/quantization/gguf_block_cache.py
            blocks = getattr(layers[0], "_hearth_group_blocks", None)
            if blocks is None or blocks.n != sum(m._hearth_blocks.n for m in layers):
                blocks = concat([m._hearth_blocks for m in layers])
            group.project = _project(blocks, group.bias, group.project)
            grouped.update(id(m) for m in layers)
            size += blocks.nbytes
    for module in model.modules():
        blocks = getattr(module, "_hearth_blocks", None)
        if blocks is None or id(module) in grouped or hasattr(module, "_hf_hook"):
            continue
        set_forward(module, _project(blocks, module.bias, module.forward))
        size += blocks.nbytes
    return size
