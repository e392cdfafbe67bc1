"""Triton kernel: dynamic per-token fp8 quantization of a matmul's input in one launch.

`quantize_rows(x [M, K]) -> (q float8_e4m3fn [M, K], scale float32 [M, 1])`, equal bit for bit to
quantization/fp8.py's `quantize_activation` (torch ops: ~9 launches and float32 copies of x). The
rounding to e4m3 is done in float32 arithmetic (round half to even onto e4m3's grid, including
its subnormals), so the final cast converts exact values only: the result does not depend on
the conversion's own rounding mode (Triton's interpreter rounds wrongly across powers of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth.engine.kernels.devices import on_device

_DIV_RN = hasattr(tl.math, "div_rn")
_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (y + M) - M rounds |y| < 2^22 to nearest even


@triton.jit
def _quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK: tl.constexpr, DIV_RN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    top = tl.max(amax, 0)
    scale = tl.maximum(tl.math.div_rn(top, 448.0) if DIV_RN else top / 448.0, 1e-12)
    tl.store(s_ptr + row, scale)
    for start in range(0, K, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * K + cols, mask=cols < K, other=0.0).to(tl.float32)
        # IEEE division, as torch's (Triton's `/` may be approximate on GPUs)
        v = tl.math.div_rn(x, scale) if DIV_RN else x / scale
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        # e4m3's spacing at v: 2^(e - 3), e = v's binary exponent, floored at -6 (subnormals)
        exponent = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, -6)
        ulp = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((3 - exponent + 127) << 23).to(tl.float32, bitcast=True)  # 1 / ulp
        y = v * inverse  # |y| <= 16, exact (a power of two)
        rounded = ((y + _MAGIC) - _MAGIC) * ulp
        sign = v.to(tl.int32, bitcast=True) & -2147483648  # -0.0 stays -0.0, as torch's cast
        rounded = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        tl.store(q_ptr + row * K + cols, rounded.to(q_ptr.dtype.element_ty), mask=cols < K)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (fp32/bf16/fp16) -> (q float8_e4m3fn [M, K], scale float32 [M, 1]):
    scale = max(row absmax / 448, 1e-12), q = round_e4m3(x / scale)."""
    rows = x.contiguous()
    m, k = rows.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 2048)
    with on_device(x):
        _quant_rows_kernel[(m,)](
            rows, q, scale, k, BLOCK=block, DIV_RN=_DIV_RN, num_warps=4 if block < 2048 else 8
        )
    return q, scale
