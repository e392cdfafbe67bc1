"""Triton kernels for the elementwise work around the matmuls: RMSNorm, and SiLU(gate) * up.

Eager transformers runs each of these as 3-7 small kernels with float32 intermediates in memory;
on a GPU that is ~30% of a prefill step and a few microseconds of launch per kernel at batch 1.
`patch_model` swaps the forward of the norms and MLPs of families whose modules compute exactly
this (Llama, Mistral, Qwen2/3); the rounding steps of the originals are kept (float32 math,
rounded to the input dtype where transformers rounds), so outputs match to the last bit or two.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from hearth.engine.kernels.devices import on_device
from hearth.engine.kernels.fusion import set_forward

# Norms computing weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) (not Gemma's 1 + weight).
NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}  # down(act(gate(x)) * up(x))


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, size, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < size
    x = tl.load(x_ptr + row * size + cols, mask=inside, other=0.0)
    xf = x.to(tl.float32)
    variance = tl.sum(xf * xf, 0) / size
    normed = (xf * tl.math.rsqrt(variance + eps)).to(x.dtype)  # rounded as transformers does
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * size + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < size
    gate = tl.load(gu_ptr + row * 2 * size + cols, mask=inside, other=0.0)
    up = tl.load(gu_ptr + row * 2 * size + size + cols, mask=inside, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # SiLU, rounded as F.silu's output is
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * size + cols, out.to(out_ptr.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., H] with weight [H]."""
    size = x.shape[-1]
    rows = x.reshape(-1, size).contiguous()  # [M, H]
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    block = triton.next_power_of_2(size)
    with on_device(x):
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, size, eps, BLOCK=block, num_warps=min(16, max(1, block // 512))
        )
    return out.view(*x.shape[:-1], size)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of gate_up [..., 2I] (gate first). Returns [..., I]."""
    size = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * size).contiguous()  # [M, 2I]
    out = torch.empty(rows.shape[0], size, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    with on_device(gate_up):
        _silu_mul_kernel[(rows.shape[0], triton.cdiv(size, block))](
            rows, out, size, BLOCK=block, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], size)


def _norm_forward(module: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(hidden_states, module.weight, module.variance_epsilon)

    return forward


def _mlp_forward(module: nn.Module, gate_up):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module.down_proj(silu_mul(gate_up(x)))  # [.., 2I] -> [.., I]

    return forward


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _joined(first: torch.Tensor | None, second: torch.Tensor | None) -> torch.Tensor | None:
    """One [n1 + n2, ...] view over two tensors that follow each other in memory (fusion.py
    leaves gate and up so), else None."""
    if first is None or second is None or first.dtype != second.dtype:
        return None
    if not (first.is_contiguous() and second.is_contiguous()):
        return None
    if first.data_ptr() + first.numel() * first.element_size() != second.data_ptr():
        return None
    shape = (first.shape[0] + second.shape[0], *first.shape[1:])
    return torch.as_strided(first, shape, first.stride())


@torch.no_grad()
def patch_model(model: nn.Module) -> int:
    """Swap in the fused forwards; returns how many modules were patched. MLPs are patched
    only where gate and up were fused into one matmul (engine/kernels/fusion.py)."""
    patched = 0
    for module in model.modules():
        kind = type(module).__name__
        if hasattr(module, "_hf_hook"):  # accelerate's device hook lives in forward: keep it
            continue
        if kind in NORMS and hasattr(module, "variance_epsilon"):
            set_forward(module, _norm_forward(module))
            patched += 1
        elif kind in MLPS and _is_silu(getattr(module, "act_fn", None)):
            gate, up = module.gate_proj, module.up_proj
            group = getattr(gate, "_hearth_group", None)
            # fp8 (engine/quantization/fp8.py): the fused group's matmul
            if type(gate) is not nn.Linear:
                if group is None or group.sizes != [gate.out_features, up.out_features]:
                    continue
                set_forward(module, _mlp_forward(module, group.project))
                patched += 1
                continue
            weight = _joined(gate.weight, up.weight)  # [2I, H]
            bias = _joined(gate.bias, up.bias)
            if weight is None or (bias is None) != (gate.bias is None):
                continue
            set_forward(module, _mlp_forward(module, partial(F.linear, weight=weight, bias=bias)))
            patched += 1
    return patched
