"""The batched LoRA linear: a forward hook adding each row's adapter delta to a target layer.

A hook (not a module swap) composes with whatever forward hearth installed on the layer (fused
q/k/v and gate/up groups, the CPU matmul): it sees the layer's input x [1, n, in] (the step's
packed tokens) and output [1, n, out] and returns output + delta, where the rows of each adapter
slot s get `(x[rows] @ A[s, :r]^T) @ B[s, :, :r]^T` (B already holds the scale). Rows of the
base model (slot -1) are left as they are. One pair of small matmuls per adapter in the step:
requests of different adapters and of the base share the step's one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LoraStep:
    """One step's rows per adapter slot: (slot, row indices [m] on the device, or None when
    every row of the step uses that slot)."""

    groups: list[tuple[int, torch.Tensor | None]]
    num_rows: int  # n: the step's packed tokens


class StackedLora:
    """One target layer's adapter weights for every slot, zero-padded to the largest rank.

    `a` [S, r_max, in], `b` [S, out, r_max] (model dtype, model device); `ranks[s]` is slot s's
    rank for this layer (0: the adapter in slot s does not adapt this layer).
    """

    def __init__(self, layer: nn.Module, slots: int, max_rank: int) -> None:
        weight = next(p for p in layer.parameters() if p.dim() == 2)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.bfloat16
        device = weight.device
        self.a = torch.zeros(slots, max_rank, layer.in_features, dtype=dtype, device=device)
        self.b = torch.zeros(slots, layer.out_features, max_rank, dtype=dtype, device=device)
        self.ranks = [0] * slots

    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy A [r, in] and scaled B [out, r] into `slot` (None: the slot does not adapt it)."""
        if a is None or b is None:
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        self.a[slot, :r].copy_(a)  # [r, in]
        self.b[slot, :, :r].copy_(b)  # [out, r]
        self.ranks[slot] = r

    def delta(self, x: torch.Tensor, out: torch.Tensor, step: LoraStep) -> torch.Tensor:
        """out [n, out_f] plus every slot's delta on its rows of x [n, in_f]; a new tensor."""
        result = out
        for slot, rows in step.groups:
            r = self.ranks[slot]
            if r == 0:
                continue
            a, b = self.a[slot, :r], self.b[slot, :, :r]  # [r, in], [out, r]
            if rows is None:
                result = result + (x.to(a.dtype) @ a.T) @ b.T  # [n, out]
            else:
                part = (x.index_select(0, rows).to(a.dtype) @ a.T) @ b.T  # [m, out]
                result = result.index_add(0, rows, part.to(result.dtype))
        return result


def make_hook(stack: StackedLora, current: Callable[[], LoraStep | None]):
    """A forward hook for one target layer: adds the deltas of the step `current()` returns
    (None: a base-only step, the output is left untouched)."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        step = current()
        if step is None:
            return None
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1])  # [n, in]
        if x2.shape[0] != step.num_rows:  # not the step's packed tokens: leave it alone
            return None
        out2 = output.reshape(-1, output.shape[-1])  # [n, out]
        return stack.delta(x2, out2, step).view(output.shape)

    return hook
