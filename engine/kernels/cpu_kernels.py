"""Native CPU kernels (kernels/csrc/cpu_kernels.cpp): compiled per instruction set, run via ctypes.

The decode attention reads the paged KV cache in place, where the PyTorch path copies every
sequence's blocks out (index_select) and then runs SDPA over the copy: on a 2-vCPU machine at
batch 32 that copy is most of the attention time. The matmul reads weights packed once at load
([N/16, K, 16], `pack_weight`) a single time per call.

The one source is built into variants, each with register tiles sized for its register file:
- `avx512`: 32 zmm registers of 16 floats (needs avx512f/bw/vl, avx2, fma);
- `avx2`: 16 ymm registers of 8 floats, no AVX-512 instruction (needs avx2, fma);
- `generic`: the compiler's baseline vectors (any CPU the compiler targets).
`variants()` lists those this CPU can run, fastest expected first; a variant whose ISA the CPU
lacks (by /proc/cpuinfo) is never built nor loaded. All variants read the same packed layout, so
a caller can switch between them without repacking, and avx512 and avx2 give bit-identical
matmul results (the same FMA chain per output). Each variant is built on first use with the
system C++ compiler (`$CXX`, else g++ or c++) and cached under hearth's cache dir, keyed by the
source, the flags, the compiler and the CPU; no compiler means no variants (`problem()` says
why) and the engine keeps the PyTorch path.

Longer than ~300 lines on purpose: the bindings of one C++ source (build per ISA, load, check,
and one typed wrapper per kernel) change together with it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import torch

from hearth.engine.threads import team_size
from hearth.paths import cache_dir

log = logging.getLogger("hearth.engine")

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]


class Variant(NamedTuple):
    flags: tuple[str, ...]  # compiler flags that select the ISA (and the source's tiles)
    needs: frozenset[str]  # /proc/cpuinfo flags the CPU must have to run the build


_X86 = ("-march=x86-64", "-mtune=native")  # no ISA beyond the named -m flags; scheduled for here
VARIANTS: dict[str, Variant] = {  # fastest expected first
    "avx512": Variant(
        (*_X86, "-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"),
        frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"}),
    ),
    "avx2": Variant((*_X86, "-mavx2", "-mfma", "-mno-avx512f"), frozenset({"avx2", "fma"})),
    "generic": Variant((), frozenset()),
}

_lock = threading.Lock()
# variant name -> its loaded library, or why there is none; None -> the default variant's
_state: dict[str | None, ctypes.CDLL | str] = {}


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 "flags", Arm "Features"); empty
    elsewhere, which leaves only the generic variant."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def variants() -> list[str]:
    """The variants this CPU can run, fastest expected first (e.g. ["avx512", "avx2", "generic"]
    on an AVX-512 x86 CPU, ["avx2", "generic"] on an AVX2-only one); [] without a C++ compiler.
    Builds nothing: a listed variant can still fail to build (`problem(name)`)."""
    if _compiler() is None:
        return []
    flags = _cpu_flags()
    return [name for name, variant in VARIANTS.items() if variant.needs <= flags]


def _link_flags() -> list[str]:
    """Link against the OpenMP runtime PyTorch ships (its pip wheels bundle libgomp), so the
    kernels share torch's thread pool instead of starting a second one."""
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():
        return [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    return []


def compile_library(compiler: str, source: Path, flags: list[str], stem: str) -> Path:
    """`source` built with `flags` (plus torch's libgomp) into a shared library, cached under
    the hearth cache dir as `{stem}-{key}.so`, the key covering the source, the flags, the
    compiler's version and the CPU's flags (-mtune=native depends on the CPU). Raises
    RuntimeError with the compiler's message when the build fails."""
    flags = [*flags, *_link_flags()]
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    cpu = " ".join(sorted(_cpu_flags()))
    key = hashlib.sha256(
        "\0".join([source.read_text(), " ".join(flags), version, cpu]).encode()
    ).hexdigest()[:24]
    target = cache_dir() / "kernels" / f"{stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, str(source), "-o", str(built)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders each publish a whole file
    log.info("compiled %s into %s", source.name, target)
    return target


def open_variant(
    source: Path, name: str, flags: list[str], needs: frozenset[str] | set[str], isa_symbol: str
) -> ctypes.CDLL:
    """Build (or find in the cache) and load the `name` variant of `source`, compiled with
    `flags` (all of them) for a CPU that has the flags `needs`; the library's `isa_symbol()`
    must name the variant. Raises RuntimeError why it cannot (a missing ISA is refused before
    anything is built)."""
    missing = set(needs) - _cpu_flags()
    if missing:  # checked before building: an ISA the CPU lacks is never loaded
        raise RuntimeError(f"this CPU lacks {' '.join(sorted(missing))}")
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    stem = f"{source.stem}-{name}"
    lib = ctypes.CDLL(str(compile_library(compiler, source, flags, stem)))
    isa_fn = getattr(lib, isa_symbol)
    isa_fn.restype = ctypes.c_char_p
    isa_fn.argtypes = []
    if (isa := isa_fn().decode()) != name:
        raise RuntimeError(f"the {name} build compiled the {isa} code (check the flags)")
    return lib


def _open(name: str) -> ctypes.CDLL:
    """Build (or find in the cache) and load one variant; raises why it cannot."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CPU kernel variant {name!r} (known: {', '.join(VARIANTS)})")
    variant = VARIANTS[name]
    lib = open_variant(SOURCE, name, [*FLAGS, *variant.flags], variant.needs, "hearth_isa")
    fn = lib.hearth_paged_decode_f32
    fn.restype = ctypes.c_int
    fn.argtypes = [
        *[ctypes.c_void_p] * 6,  # q, k, v, tables, lens, out
        *[ctypes.c_int64] * 7,  # B, H, Hkv, D, N, bs, nb
        ctypes.c_float,  # scale
        ctypes.c_int,  # threads
    ]
    fn = lib.hearth_linear_f32
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    return lib


def _load(variant: str | None) -> ctypes.CDLL | str:
    """The variant's library (None: the first of variants()), or why there is none. Cached:
    each variant is built and loaded once per process."""
    found = _state.get(variant)
    if found is not None:
        return found
    with _lock:
        if variant not in _state:
            name = variant
            if name is None:
                listed = variants()
                name = listed[0] if listed else None
            if name is None:
                _state[None] = "no C++ compiler found (set CXX, or install g++)"
            elif name not in VARIANTS:
                raise ValueError(
                    f"unknown CPU kernel variant {name!r} (known: {', '.join(VARIANTS)})"
                )
            else:
                if name not in _state:
                    try:
                        _state[name] = _open(name)
                    except Exception as exc:  # a failed build, a library that won't load
                        _state[name] = f"{type(exc).__name__}: {exc}"
                _state[variant] = _state[name]
        return _state[variant]


def _library(variant: str | None) -> ctypes.CDLL:
    lib = _load(variant)
    if isinstance(lib, str):
        raise RuntimeError(f"the CPU kernels are unavailable: {lib}")
    return lib


def problem(variant: str | None = None) -> str | None:
    """Why the variant (None: the first of variants()) cannot run on this machine, or None.
    Builds and loads it on first call. Raises ValueError for a name not in VARIANTS."""
    lib = _load(variant)
    return lib if isinstance(lib, str) else None


def paged_decode(
    q: torch.Tensor,  # [B, H, D] float32
    k_blocks: torch.Tensor,  # [N, bs, Hkv, D] float32
    v_blocks: torch.Tensor,
    tables: torch.Tensor,  # [B, nb] block ids (int64)
    lens: torch.Tensor,  # [B] context lengths, each >= 1 (int64)
    scale: float,
    variant: str | None = None,
) -> torch.Tensor:
    """Softmax(q K^T * scale) V per sequence over its first lens[b] cached tokens. [B, H, D].

    variant: a name from variants() (None: the first). Raises ValueError for CPU tensors of the
    wrong dtype/shape or an out-of-range length or block id, RuntimeError when the variant cannot
    run here."""
    lib = _library(variant)
    batch, heads, dim = q.shape
    _, block_size, kv_heads, kv_dim = k_blocks.shape
    tensors = (q, k_blocks, v_blocks, tables, lens)
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("paged_decode runs on CPU tensors")
    if q.dtype != torch.float32 or k_blocks.dtype != q.dtype or v_blocks.dtype != q.dtype:
        raise ValueError("paged_decode needs float32 q and KV cache")
    if kv_dim != dim or heads % kv_heads or v_blocks.shape != k_blocks.shape:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, KV {tuple(k_blocks.shape)}")
    if not (k_blocks.is_contiguous() and v_blocks.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    q = q.contiguous()
    if tables.dtype != torch.int64 or not tables.is_contiguous():
        tables = tables.to(torch.int64).contiguous()
    if lens.dtype != torch.int64 or not lens.is_contiguous():
        lens = lens.to(torch.int64).contiguous()
    out = torch.empty_like(q)  # [B, H, D]
    status = lib.hearth_paged_decode_f32(
        q.data_ptr(),
        k_blocks.data_ptr(),
        v_blocks.data_ptr(),
        tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        heads,
        kv_heads,
        dim,
        k_blocks.shape[0],
        block_size,
        tables.shape[1],
        scale,
        team_size(),
    )
    if status != 0:
        raise ValueError("paged_decode: a context length or block id is out of range")
    return out


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight [N, K] (float32, N % 16 == 0) as the matmul kernel of every variant reads
    it: [N/16, K, 16], each 16-output panel contiguous. Raises ValueError for other weights."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or n % 16:
        raise ValueError(f"cannot pack a {weight.dtype} {tuple(weight.shape)} weight")
    return weight.detach().reshape(n // 16, 16, k).transpose(1, 2).contiguous()


def linear(
    x: torch.Tensor,  # [..., K] float32
    packed: torch.Tensor,  # [N/16, K, 16] from pack_weight
    bias: torch.Tensor | None,  # [N] float32, contiguous
    variant: str | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight packed by pack_weight. x [..., K] -> [..., N].

    Each output is one FMA chain over k in order: a row's result does not depend on the other
    rows of x, to the last bit. variant: a name from variants() (None: the first). Raises
    ValueError when x does not fit the weight, RuntimeError when the variant cannot run here."""
    lib = _library(variant)
    chunks, k, _ = packed.shape
    n = chunks * 16
    if x.dtype != torch.float32 or x.shape[-1] != k:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)} does not fit a [{n}, {k}] weight")
    rows = x.reshape(-1, k).contiguous()  # [M, K]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype)  # [M, N]
    lib.hearth_linear_f32(
        rows.data_ptr(),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows.shape[0],
        k,
        n,
        team_size(),
    )
    return out.view(*x.shape[:-1], n)
