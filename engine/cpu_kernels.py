"""Native CPU kernels (engine/csrc/cpu_kernels.cpp): compiled once per machine, run via ctypes.

The decode attention reads the paged KV cache in place, where the PyTorch path copies every
sequence's blocks out (index_select) and then runs SDPA over the copy: on a 2-vCPU machine at
batch 32 that copy is most of the attention time. The source is built with the system C++
compiler (`$CXX`, else g++ or c++) for this CPU (-march=native) and cached under hearth's cache
dir, keyed by the source, the flags, the compiler and the CPU; no compiler means no kernels
(`problem()` says why) and the engine keeps the PyTorch path.
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

import torch

from engine.gguf_cache import cache_dir

log = logging.getLogger("hearth.engine")

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the loaded library, or "error": why there is none


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _link_flags() -> list[str]:
    """Link against the OpenMP runtime PyTorch ships (its pip wheels bundle libgomp), so the
    kernels share torch's thread pool instead of starting a second one."""
    torch_lib = Path(torch.__file__).parent / "lib"
    if (torch_lib / "libgomp.so.1").exists():
        return [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}"]
    return []


def _build(compiler: str) -> Path:
    flags = FLAGS + _link_flags()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60
    ).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_flags()]).encode()
    ).hexdigest()[:24]
    target = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *flags, str(SOURCE), "-o", str(built)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)  # atomic: concurrent builders each publish a whole file
    log.info("compiled the CPU kernels into %s", target)
    return target


def _library() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the CPU kernels are unavailable: {_state['error']}")
    return lib


def _load() -> ctypes.CDLL | None:
    with _lock:
        if not _state:
            try:
                compiler = _compiler()
                if compiler is None:
                    raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
                lib = ctypes.CDLL(str(_build(compiler)))
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
                _state["lib"] = lib
            except Exception as exc:  # no compiler, a failed build, a library that won't load
                _state["error"] = f"{type(exc).__name__}: {exc}"
        return _state.get("lib")  # type: ignore[return-value]


def problem() -> str | None:
    """Why the kernels cannot run on this machine (building them on first call), or None."""
    return None if _load() is not None else str(_state["error"])


def paged_decode(
    q: torch.Tensor,  # [B, H, D] float32
    k_blocks: torch.Tensor,  # [N, bs, Hkv, D] float32
    v_blocks: torch.Tensor,
    tables: torch.Tensor,  # [B, nb] block ids (int64)
    lens: torch.Tensor,  # [B] context lengths, each >= 1 (int64)
    scale: float,
) -> torch.Tensor:
    """Softmax(q K^T * scale) V per sequence over its first lens[b] cached tokens. [B, H, D]."""
    lib = _library()
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
    tables = tables.to(torch.int64).contiguous()
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
        torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError("paged_decode: a context length or block id is out of range")
    return out


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A linear weight [N, K] (float32, N % 16 == 0) as the matmul kernel reads it: [N/16, K, 16],
    each 16-output panel contiguous."""
    n, k = weight.shape
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or n % 16:
        raise ValueError(f"cannot pack a {weight.dtype} {tuple(weight.shape)} weight")
    return weight.detach().reshape(n // 16, 16, k).transpose(1, 2).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the weight packed by pack_weight. x [..., K] -> [..., N]."""
    chunks, k, _ = packed.shape
    n = chunks * 16
    if x.dtype != torch.float32 or x.shape[-1] != k:
        raise ValueError(f"x {x.dtype} {tuple(x.shape)} does not fit a [{n}, {k}] weight")
    rows = x.reshape(-1, k).contiguous()  # [M, K]
    out = torch.empty(rows.shape[0], n, dtype=x.dtype)  # [M, N]
    _library().hearth_linear_f32(
        rows.data_ptr(),
        packed.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        rows.shape[0],
        k,
        n,
        torch.get_num_threads(),
    )
    return out.view(*x.shape[:-1], n)
