"""The machine a benchmark ran on, printed beside every table (CPU model, ISA flags, cores, GPU).

Figures from one machine say nothing about another: CPUs differ in vector width (AVX2 vs
AVX-512/AMX) and GPUs in memory bandwidth, so every benchmark names the machine it measured.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The ISA flags that change which kernel wins (x86 /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def describe() -> str:
    """One line: CPU model, the ISA flags that matter, usable cores, torch; GPU name if any."""
    flags = cpu_flags()
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "no AVX2"
    line = f"CPU: {cpu_model()} ({isa}), {len(os.sched_getaffinity(0))} cores"
    try:
        import torch

        line += f"; torch {torch.__version__}"
        if torch.cuda.is_available():
            line += f"; GPU: {torch.cuda.get_device_name()}"
    except ImportError:
        pass
    return line


if __name__ == "__main__":
    print(describe())
