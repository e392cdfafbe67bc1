"""The autotune decision cache: one JSON file per key under $HEARTH_CACHE_DIR/autotune.

The key holds everything a decision depends on (`decision_key`), so a changed CPU, GPU, library
version, kernel source, model shape or engine setting measures again, and nothing else does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hearth.engine.kernels.selection import Kernels
from hearth.paths import cache_dir

if TYPE_CHECKING:
    from hearth.engine.kernels.autotune import Result, Workload

log = logging.getLogger("hearth.engine")

_KERNEL_SOURCES = (
    "csrc",
    "triton_attention.py",
    "fused_ops.py",
    "cpu_kernels.py",
    "fp8_kernels.py",
)
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "neon", "sve")


def _hardware(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {
            "gpu": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory": props.total_memory,
            "gpus": torch.cuda.device_count(),
        }
    flags = ""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")) and not flags:
                flags = line.split(":", 1)[1].strip()
            elif line.startswith("model name") and model == platform.processor():
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {
        "cpu": model,
        "isa": " ".join(f for f in ISA_FLAGS if f in flags.split()),
        "flags": hashlib.sha256(flags.encode()).hexdigest()[:16],  # all of them, in the key
        "cores": f"{len(os.sched_getaffinity(0))} cores",
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _sources_digest() -> str:
    """The kernels' own sources: a change to any of them may change the winner."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _KERNEL_SOURCES:
        path = root / name
        for file in sorted(path.rglob("*") if path.is_dir() else [path]):
            if file.is_file():
                digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def decision_key(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    settings: Any,
    loads: list[Workload],
) -> dict[str, Any]:
    """Everything a decision depends on: hardware (CPU model and ISA flags, or GPU name and
    compute capability), software versions and kernel sources, the model's shape and module
    types (quantized layers time differently), dtype, block size and the timed workloads."""
    import transformers

    cfg = model.config.get_text_config()
    shape_keys = (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    )  # fmt: skip
    explicit = ("decode_kernel", "cuda_graphs", "fused_kernels", "cpu_matmul", "block_size")
    return {
        "hardware": _hardware(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kernels": _sources_digest(),
        "model": {key: getattr(cfg, key, None) for key in shape_keys},
        "modules": sorted({type(m).__name__ for m in model.modules()}),
        "quantization": getattr(model, "hearth_quantization", None),
        "gguf_blocks": sorted(
            {m._hearth_blocks.kind for m in model.modules() if hasattr(m, "_hearth_blocks")}
        ),
        "triton": _triton_version() if device.type == "cuda" else None,
        "dtype": str(dtype),
        "settings": {key: getattr(settings, key) for key in explicit},
        "workloads": [asdict(load) for load in loads],
    }


def _path(key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return cache_dir() / "autotune" / f"{digest[:32]}.json"


def load_decision(key: dict[str, Any]) -> tuple[Kernels, dict[str, float], str | None] | None:
    """The cached winner, its step times and why it is provisional (None: a trusted decision;
    kernels/autotune_noise.py) for this key, or None."""
    try:
        data = json.loads(_path(key).read_text())
        return Kernels(**data["kernels"]), data["times"], data.get("provisional")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_decision(
    key: dict[str, Any],
    winner: Result,
    results: list[Result],
    provisional: str | None = None,
    load: float | None = None,
) -> None:
    """Cache the decision; `provisional`: why it is re-measured at a later quiet start (None:
    trusted), `load`: the host's load per core when it was measured."""
    path = _path(key)
    data = {
        "provisional": provisional,
        "load": load,
        "key": key,
        "kernels": winner.kernels._asdict(),
        "times": winner.times,
        "candidates": [
            {"kernels": r.kernels.describe(), "times": r.times, "error": r.error} for r in results
        ],
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only cache: measured again next start
        log.warning("autotune: cannot cache the decision in %s: %s", path, exc)
