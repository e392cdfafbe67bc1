"""CUDA graphs for pure decode steps: one captured forward per batch-size bucket.

A step of B single-token decodes is padded to the next bucket and replayed from static input
buffers. Padding rows decode a dummy token whose K/V go to a scratch block no sequence owns; their
logits are dropped. Needs the Triton decode kernel (fixed shapes; it reads context lengths from
memory). Without CUDA the same static-buffer path runs eagerly, which is how CPU tests check it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hearth.engine.kernels.attention import PagedBatch
from hearth.engine.kernels.devices import on_device

Forward = Callable[[dict[str, Any]], torch.Tensor]  # model kwargs -> logits [B, V]


class GraphCaptureError(RuntimeError):
    """The forward ran eagerly but could not be captured (a host sync or dynamic control flow)."""


def buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every 16 up to max_batch (always included)."""
    sizes = [size for size in (1, 2, 4, 8) if size < max_batch]
    sizes += range(16, max_batch, 16)
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    def __init__(
        self,
        forward: Forward,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        max_batch: int,
        max_blocks: int,
        scratch_block: int,
        sizes: list[int] | None = None,
    ) -> None:
        """Capture one graph per batch-size bucket (`sizes`, default `buckets(max_batch)`;
        autotune captures only the sizes it times)."""
        self.device = k_cache[0].device
        self.block_size = k_cache[0].shape[1]
        self.scratch = scratch_block
        self.capture = self.device.type == "cuda"
        dev, long, i32 = self.device, torch.long, torch.int32
        self.ids = torch.zeros(1, max_batch, dtype=long, device=dev)  # [1, Bmax]
        self.positions = torch.zeros(1, max_batch, dtype=long, device=dev)
        self.slots = torch.zeros(max_batch, dtype=long, device=dev)  # [Bmax]
        self.rows = torch.arange(max_batch, dtype=long, device=dev)  # [Bmax]
        self.tables = torch.full((max_batch, max_blocks), scratch_block, dtype=i32, device=dev)
        self.lens = torch.ones(max_batch, dtype=i32, device=dev)  # [Bmax]
        self.slots.fill_(scratch_block * self.block_size)
        self.sizes = sorted(sizes) if sizes else buckets(max_batch)
        self._forward = forward
        self._kv = (k_cache, v_cache)
        self._graphs: dict[int, tuple[Any, torch.Tensor | None]] = {}
        with on_device(k_cache[0]):  # streams and captures belong to the current device
            pool = torch.cuda.graph_pool_handle() if self.capture else None
            for size in reversed(self.sizes):  # largest first: the others fit in its memory pool
                self._graphs[size] = self._record(size, pool)

    def kwargs(self, size: int) -> dict[str, Any]:
        """Model inputs for a bucket: views of the static buffers."""
        k_cache, v_cache = self._kv
        batch = PagedBatch(
            k_cache=k_cache,
            v_cache=v_cache,
            slot_mapping=self.slots[:size],
            decode_rows=self.rows[:size],
            decode_tables=self.tables[:size],
            decode_mask=None,
            prefills=[],
            decode_lens=self.lens[:size],
            decode_kernel="triton",
        )
        return {
            "input_ids": self.ids[:, :size],
            "position_ids": self.positions[:, :size],
            "use_cache": False,
            "logits_to_keep": self.rows[:size],
            "hearth_batch": batch,
        }

    def _record(self, size: int, pool: Any) -> tuple[Any, torch.Tensor | None]:
        if not self.capture:
            return None, None
        kwargs = self.kwargs(size)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (allocator, kernels) outside the capture
            for _ in range(2):
                self._forward(kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                out = self._forward(kwargs)
        except Exception as exc:  # the eager warm-up above ran: it is the capture that failed
            raise GraphCaptureError(f"batch {size}: {exc}") from exc
        return graph, out

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        lens: list[int],
    ) -> torch.Tensor | None:
        """Logits [B, V] of B decodes, or None when B is above the largest bucket."""
        count = len(input_ids)
        size = next((s for s in self.sizes if s >= count), None)
        if size is None:
            return None
        pad = size - count
        width = max(len(t) for t in tables)
        dev, long, i32 = self.device, torch.long, torch.int32
        self.ids[0, :size].copy_(torch.tensor(input_ids + [0] * pad, dtype=long), True)
        self.positions[0, :size].copy_(torch.tensor(positions + [0] * pad, dtype=long), True)
        scratch_slot = self.scratch * self.block_size
        self.slots[:size].copy_(torch.tensor(slots + [scratch_slot] * pad, dtype=long), True)
        rows = [t + [self.scratch] * (width - len(t)) for t in tables]
        rows += [[self.scratch] * width] * pad
        self.tables[:size, :width].copy_(torch.tensor(rows, dtype=i32), True)
        self.lens[:size].copy_(torch.tensor(lens + [1] * pad, dtype=i32), True)
        graph, out = self._graphs[size]
        if graph is None:  # no CUDA: the same buffers, run eagerly
            out = self._forward(self.kwargs(size))
        else:
            with on_device(out):
                graph.replay()
        assert dev == out.device
        return out[:count].clone()  # the graph's buffer is overwritten by the next replay
