"""The paged KV cache: its shape (`KVCacheSpec`), the memory budget, budget → block count, and the
per-layer tensors (`KVCache`).

Sizing runs before the engine starts (builder.build_engine): `num_kv_blocks` divides the
budget (`kv_budget_bytes`) by the bytes of one block on this rank. The runner then allocates
`KVCache(spec, num_blocks, block_size, devices)`: per layer K and V of
[num_blocks + 1, block_size, Hkv, D], the last block a scratch block no sequence owns.
"""

from __future__ import annotations

import math
import mmap
import sys
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from hearth.engine import distributed
from hearth.engine.config import EngineSettings


@dataclass(frozen=True)
class KVCacheSpec:
    """What one token's K and V take on this rank: layers x KV heads x head dim of `dtype`."""

    num_layers: int
    num_kv_heads: int  # on this rank (tensor parallelism splits the heads)
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model(
        cls, model: PreTrainedModel, dtype: torch.dtype, tp_size: int = 1
    ) -> KVCacheSpec:
        """The spec of a decoder-only model's text config. Raises ValueError when the KV heads
        do not split evenly over `tp_size` ranks."""
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        if kv_heads % tp_size:
            raise ValueError(f"{kv_heads} KV heads cannot be split over {tp_size} ranks")
        return cls(cfg.num_hidden_layers, kv_heads // tp_size, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers (on this rank)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def kv_budget_bytes(settings: EngineSettings, device: torch.device) -> int:
    """CPU: the configured bytes (1 GiB default). CUDA: a fraction of memory, less what is used."""
    if settings.kv_cache_memory is not None:
        return int(settings.kv_cache_memory)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return max(0, int(total * settings.gpu_memory_utilization) - used)
    return 1 << 30


def num_kv_blocks(spec: KVCacheSpec, settings: EngineSettings, device: torch.device) -> int:
    """KV blocks of `settings.block_size` tokens that fit the budget; under tensor parallelism,
    what fits on every rank (a collective: every rank calls it)."""
    per_block = spec.bytes_per_token * settings.block_size
    return distributed.agree_min(kv_budget_bytes(settings, device) // per_block)


def budget_problem(settings: EngineSettings, device: torch.device) -> str:
    """Why the KV budget is empty, with the figures to fix it."""
    if settings.kv_cache_memory is not None or device.type != "cuda":
        return f"kv_cache_memory {settings.kv_cache_memory}: raise it"
    free, total = torch.cuda.mem_get_info(device)
    used, allowed = total - free, total * settings.gpu_memory_utilization
    return (
        f"{used / 2**30:.1f} GiB of the GPU's {total / 2**30:.1f} GiB are in use, "
        f"gpu_memory_utilization {settings.gpu_memory_utilization} allows {allowed / 2**30:.1f} "
        f"GiB for weights and KV: raise it to {min(1.0, (used + 2**30) / total + 0.01):.2f} "
        "or more, or set kv_cache_memory"
    )


def layer_devices(model: PreTrainedModel, num_layers: int) -> list[torch.device]:
    """The device of each attention layer (they differ under device_map); layers whose module
    has no parameters get the model's first parameter's device."""
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx not in devices:
            param = next(module.parameters(), None)
            if param is not None:
                devices[idx] = param.device
    fallback = next(model.parameters()).device
    return [devices.get(i, fallback) for i in range(num_layers)]


# Linux: MADV_DONTNEED on a private anonymous mapping reads back as zeros (elsewhere: torch.zeros)
LAZY_PAGES = sys.platform == "linux"


class _PageZeros:
    """CPU zeros in private anonymous mappings: the OS gives their pages zero-filled on first
    touch, so blocks no sequence has used take no resident memory (an idle server's RSS holds
    the KV it used, not the whole budget), and `release` zeroes them again by handing the pages
    back (madvise MADV_DONTNEED) instead of writing zeros."""

    def __init__(self) -> None:
        self.mappings: list[mmap.mmap] = []

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape)
        mapping = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
        self.mappings.append(mapping)  # the tensor's storage holds it too, while it lives
        return torch.frombuffer(mapping, dtype=dtype, count=count).view(shape)

    def release(self) -> None:
        for mapping in self.mappings:
            mapping.madvise(mmap.MADV_DONTNEED)


class KVCache:
    """Per layer K and V blocks on the layer's device, plus one scratch block (`scratch_block`,
    the last) that CUDA graphs' padding rows write to. Zeroed: padded slots are masked out, but
    NaN garbage times a zero weight is still NaN. On the CPU the zeros are lazily committed
    pages (`_PageZeros`)."""

    def __init__(
        self, spec: KVCacheSpec, num_blocks: int, block_size: int, devices: list[torch.device]
    ) -> None:
        """`devices`: one per layer (`layer_devices`)."""
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks + 1, block_size, spec.num_kv_heads, spec.head_dim)
        self._pages = _PageZeros()

        def zeros(device: torch.device) -> torch.Tensor:
            if device.type == "cpu" and LAZY_PAGES:
                return self._pages.zeros(shape, spec.dtype)
            return torch.zeros(shape, dtype=spec.dtype, device=device)

        self.k_cache = [zeros(d) for d in devices]  # per layer [num_blocks + 1, block_size, Hkv, D]
        self.v_cache = [zeros(d) for d in devices]

    @property
    def scratch_block(self) -> int:
        """The block id no sequence owns (the last one)."""
        return self.num_blocks

    def fill(self, seed: int | None, blocks: int = 0) -> None:
        """The first `blocks` blocks of every layer filled with the same seeded normal values
        (autotune compares candidates' logits over a cache that is not all zeros), or every
        block zeroed again (seed None)."""
        if seed is None:
            self._pages.release()  # the CPU tensors' pages back to the OS: zeros again
            for tensor in (*self.k_cache, *self.v_cache):
                if tensor.device.type != "cpu" or not LAZY_PAGES:
                    tensor.zero_()
            return
        first = self.k_cache[0]
        generator = torch.Generator(device=first.device).manual_seed(seed)
        shape = (min(blocks, first.shape[0]), *first.shape[1:])  # [blocks, bs, Hkv, D]
        values = torch.randn(shape, generator=generator, device=first.device)
        for tensor in (*self.k_cache, *self.v_cache):
            tensor[: shape[0]].copy_(values.to(tensor.device, tensor.dtype))
