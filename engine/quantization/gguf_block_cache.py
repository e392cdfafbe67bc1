"""The repacked GGUF blocks of a model, cached beside its float32 conversion (a second start
reads them memory-mapped instead of re-reading, re-permuting and re-checking the GGUF file).

Entries group the sibling projections engine/kernels/fusion.py fuses (q/k/v, gate/up) into one
contiguous weight, rows in member order, so the fused matmul needs no copy: each member's
blocks are row views of it, and the first member carries the whole as `_hearth_group_blocks`.
File: <cache>/gguf/<file sha256[:24]>-blocks-v1.safetensors; tensors "<key>.qs", "<key>.scales";
metadata "entries": JSON {key: {"kind", "k", "members": [[module name, rows], ...]}}.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from hearth.engine.kernels.fusion import GROUPS
from hearth.engine.kernels.gguf_kernels import BlockWeight
from hearth.engine.loading.gguf_cache import file_digest
from hearth.paths import cache_dir

log = logging.getLogger("hearth.loader")

Entry = tuple[list[tuple[str, int]], BlockWeight]  # (member names and their rows, blocks)


def cache_path(gguf_path: str | Path) -> Path:
    return cache_dir() / "gguf" / f"{file_digest(Path(gguf_path))[:24]}-blocks-v1.safetensors"


def group(model: nn.Module, blocks: dict[str, BlockWeight]) -> list[Entry]:
    """Per-module blocks -> entries, the fusable sibling groups concatenated."""
    entries: list[Entry] = []
    taken: set[str] = set()
    for parent_name, _ in model.named_modules():
        for names in GROUPS:
            full = [f"{parent_name}.{name}" if parent_name else name for name in names]
            parts = [blocks.get(name) for name in full]
            if any(p is None for p in parts) or len({(p.kind, p.k) for p in parts}) != 1:
                continue
            qs = torch.cat([p.qs for p in parts])  # [sum n, k/32 * bytes]
            scales = torch.cat([p.scales for p in parts])
            fused = BlockWeight(parts[0].kind, qs, scales, qs.shape[0], parts[0].k)
            entries.append(([(name, p.n) for name, p in zip(full, parts, strict=True)], fused))
            taken.update(full)
    entries += [([(name, b.n)], b) for name, b in blocks.items() if name not in taken]
    return entries


def hang(model: nn.Module, entries: list[Entry]) -> int:
    """Set `_hearth_blocks` (row views) on each member module; returns the bytes held."""
    modules = dict(model.named_modules())
    for members, blocks in entries:
        start = 0
        for name, rows in members:
            view = BlockWeight(
                blocks.kind,
                blocks.qs[start : start + rows],
                blocks.scales[start : start + rows],
                rows,
                blocks.k,
            )
            modules[name]._hearth_blocks = view
            start += rows
        if len(members) > 1:
            modules[members[0][0]]._hearth_group_blocks = blocks
    return sum(blocks.nbytes for _, blocks in entries)


def save(path: Path, entries: list[Entry]) -> None:
    from safetensors.torch import save_file

    tensors, meta = {}, {}
    for i, (members, blocks) in enumerate(entries):
        key = f"e{i}"
        tensors[f"{key}.qs"], tensors[f"{key}.scales"] = blocks.qs, blocks.scales
        meta[key] = {"kind": blocks.kind, "k": blocks.k, "members": members}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".blocks-")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"entries": json.dumps(meta)})
        os.replace(tmp, path)  # atomic: a reader sees a whole file or none
    except OSError as exc:
        log.warning("could not cache the GGUF blocks in %s: %s", path, exc)
        Path(tmp).unlink(missing_ok=True)


def load(path: Path) -> list[Entry] | None:
    """The cached entries, or None when there is no (readable) cache file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["entries"])
            entries = []
            for key, info in meta.items():
                qs, scales = handle.get_tensor(f"{key}.qs"), handle.get_tensor(f"{key}.scales")
                members = [(name, int(rows)) for name, rows in info["members"]]
                blocks = BlockWeight(info["kind"], qs, scales, qs.shape[0], int(info["k"]))
                entries.append((members, blocks))
            return entries
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        if path.exists():
            log.warning("ignoring the GGUF block cache %s: %s", path, exc)
        return None
