"""Linear layers over GGUF weight blocks (kernels/csrc/gguf_kernels.cpp), built per ISA, via ctypes.

The source is built into variants (same API as engine/kernels/cpu_kernels.py):
- `avx512`: 16-float vectors, 4-row register tiles (needs avx512f/bw/vl, avx2, fma, f16c);
- `avx2`: 8-float vectors, 2-row tiles, no AVX-512 instruction (needs avx2, fma, f16c).
`variants()` lists those this CPU can run (by /proc/cpuinfo), fastest expected first; a variant
the CPU lacks is never built nor loaded. Each is compiled on first use with the system C++
compiler and cached under hearth's cache dir (key: source, flags, compiler, CPU flags), so a
second start loads it in milliseconds. No compiler, or no x86 AVX2: no variant (`problem()`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from hearth.engine.kernels.cpu_kernels import _compiler, open_variant
from hearth.engine.threads import team_size

log = logging.getLogger("hearth.engine")

SOURCE = Path(__file__).parent / "csrc" / "gguf_kernels.cpp"
FLAGS = ("-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-march=x86-64", "-mtune=native")
_ISA = {  # variant -> (compiler flags, /proc/cpuinfo flags it needs); fastest expected first
    "avx512": (
        ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl"),
        frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"}),
    ),
    "avx2": (("-mavx2", "-mfma", "-mf16c", "-mno-avx512f"), frozenset({"avx2", "fma", "f16c"})),
}
BLOCK = 32  # weights per block along K, for both Q4_1 and Q8_0

_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL | str] = {}  # variant -> its library, or why there is none
_default: str | None = None  # variants()[0], once loaded


@dataclass(frozen=True)
class BlockWeight:
    """A linear weight [n, k] kept as repacked GGUF blocks (layout: kernels/csrc/gguf_kernels.cpp).

    kind "q4_1": qs uint8 [n, k/32 * 16], scales int16 (fp16 bits) [n, k/32 * 2] (d, m);
    kind "q8_0": qs uint8 (int8 bits) [n, k/32 * 32], scales int16 (fp16 bits) [n, k/32].
    """

    kind: str
    qs: torch.Tensor
    scales: torch.Tensor
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        return self.qs.numel() + 2 * self.scales.numel()


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def variants() -> list[str]:
    """The variants this CPU can run, fastest expected first; [] without a C++ compiler."""
    return list(_variants())


@functools.cache
def _variants() -> tuple[str, ...]:
    if _compiler() is None:
        return ()
    flags = cpu_flags()
    return tuple(name for name, (_, needs) in _ISA.items() if needs <= flags)


def _open(name: str) -> ctypes.CDLL:
    if name not in _ISA:
        raise ValueError(f"unknown GGUF kernel variant {name!r} (known: {', '.join(_ISA)})")
    flags, needs = _ISA[name]
    lib = open_variant(SOURCE, name, [*FLAGS, *flags], needs, "hearth_gguf_isa")
    for fn in (lib.hearth_linear_q4_1, lib.hearth_linear_q8_0):
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def _load(variant: str | None) -> ctypes.CDLL | str:
    """The variant's library (the first of variants() when None), or why there is none."""
    global _default
    if variant is None:
        variant = _default
    lib = _libs.get(variant) if variant is not None else None
    if lib is not None:  # the per-call path: no lock, no lookups
        return lib
    with _lock:
        if variant is None:
            names = _variants()
            if not names:
                return "no variant runs here (needs x86 AVX2 with FMA and F16C, and a C++ compiler)"
            variant = names[0]
            _default = variant
        if variant not in _libs:
            try:
                _libs[variant] = _open(variant)
            except Exception as exc:  # no compiler, a failed build, a library that won't load
                _libs[variant] = f"{type(exc).__name__}: {exc}"
        return _libs[variant]


def problem(variant: str | None = None) -> str | None:
    """Why the kernels (this variant, default the fastest) cannot run here, or None."""
    lib = _load(variant)
    return lib if isinstance(lib, str) else None


def bind(
    weight: BlockWeight, bias: torch.Tensor | None = None, variant: str | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear` with this weight and bias fixed: the library and pointers looked up once, so a
    call costs a few microseconds of Python (a decode step makes ~120). x [..., K] -> [..., N].

    Raises RuntimeError when the kernels cannot run; the callable raises ValueError for an x
    that does not fit."""
    lib = _load(variant)
    if isinstance(lib, str):
        raise RuntimeError(f"the GGUF kernels are unavailable: {lib}")
    if weight.kind not in ("q4_1", "q8_0") or not weight.qs.is_contiguous():
        raise ValueError(f"cannot run {weight.kind} blocks (contiguous q4_1 / q8_0 only)")
    fn = lib.hearth_linear_q4_1 if weight.kind == "q4_1" else lib.hearth_linear_q8_0
    n, k = weight.n, weight.k
    bias = None if bias is None else bias.detach().float().contiguous()
    pointers = (weight.qs.data_ptr(), weight.scales.contiguous().data_ptr())
    bias_ptr = None if bias is None else bias.data_ptr()
    threads = team_size

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.shape[-1] != k or x.device.type != "cpu":
            raise ValueError(f"x {x.dtype} {tuple(x.shape)} does not fit a [{n}, {k}] weight")
        rows = x.reshape(-1, k)
        if not rows.is_contiguous():
            rows = rows.contiguous()  # [M, K]
        out = torch.empty((*x.shape[:-1], n), dtype=torch.float32)  # [..., N]
        fn(rows.data_ptr(), *pointers, bias_ptr, out.data_ptr(), rows.shape[0], k, n, threads())
        return out

    run.keep = (weight, bias)  # the pointers' owners live as long as the callable
    return run


def linear(
    x: torch.Tensor,  # [..., K] float32
    weight: BlockWeight,
    bias: torch.Tensor | None = None,  # [N] float32
    variant: str | None = None,
) -> torch.Tensor:
    """F.linear(x, dequantize(weight), bias) over the blocks. Returns [..., N] float32.

    Raises ValueError for a mismatched x, RuntimeError when the kernels cannot run."""
    return bind(weight, bias, variant)(x)
