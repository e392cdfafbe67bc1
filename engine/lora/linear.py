"""The batched LoRA linear: a forward hook adding each row's adapter delta to a target layer.

A hook (not a module swap) composes with whatever forward hearth installed on the layer (fused
q/k/v and gate/up groups, the CPU matmul): it sees the layer's input x [1, n, in] (the step's
packed tokens) and output [1, n, out] and returns output + delta, where the rows of each adapter
slot s get `(x[rows] @ A[s, :r]^T) @ B[s, :, :r]^T` (B already holds the scale). Rows of the
base model (slot -1) are left as they are. Requests of different adapters and of the base share
the step's one forward:

- one adapter on every row: `(x @ A^T) @ B^T`, two small matmuls;
- several adapters (or base rows too): the step's slots' A and B concatenated along the rank,
  [R, in] and [out, R] with R the sum of their ranks, and a 0/1 mask [n, R] keeping each row's
  own adapter's columns: `((x @ A_cat^T) * mask) @ B_cat^T`. Three ops whatever the number of
  adapters (a segmented matmul in dense form: R stays small, rank <= max_lora_rank each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoraStep:
    """One step's adapter slots: `slots` (sorted, those with rows), `row_slot` [n] each packed
    row's slot (-1: the base model) on the device, or None when one slot holds every row."""

    slots: list[int]
    row_slot: torch.Tensor | None
    num_rows: int  # n: the step's packed tokens
    masks: dict = field(default_factory=dict)  # column slots -> mask [n, R], shared by layers

    def mask(self, cols: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """[n, R] 1.0 where row i's slot owns column j (cols[j]: the slot of column j)."""
        key = (cols, dtype)
        if key not in self.masks:
            assert self.row_slot is not None
            owner = torch.tensor(cols, device=self.row_slot.device)  # [R]
            self.masks[key] = (self.row_slot[:, None] == owner[None, :]).to(dtype)  # [n, R]
        return self.masks[key]


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
        self._cat: tuple | None = None  # (slots, version) -> A_cat, B_cat, column slots
        self._version = 0

    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Copy A [r, in] and scaled B [out, r] into `slot` (None: the slot does not adapt it)."""
        self._version += 1
        if a is None or b is None:
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        self.a[slot, :r].copy_(a)  # [r, in]
        self.b[slot, :, :r].copy_(b)  # [out, r]
        self.ranks[slot] = r

    def delta(self, x: torch.Tensor, out: torch.Tensor, step: LoraStep) -> torch.Tensor:
        """out [n, out_f] plus each row's adapter delta of x [n, in_f]; a new tensor."""
        if step.row_slot is None:  # one adapter on every row
            slot = step.slots[0]
            r = self.ranks[slot]
            if r == 0:
                return out
            a, b = self.a[slot, :r], self.b[slot, :, :r]  # [r, in], [out, r]
            if a.dtype == out.dtype == x.dtype:
                return torch.addmm(out, x @ a.T, b.T)  # [n, out]
            return out + ((x.to(a.dtype) @ a.T) @ b.T).to(out.dtype)  # [n, out]
        a_cat, b_cat, cols = self._concat(step.slots)
        if not cols:
            return out
        lowered = (x.to(a_cat.dtype) @ a_cat.T).mul_(step.mask(cols, a_cat.dtype))  # [n, R]
        if a_cat.dtype == out.dtype:
            return torch.addmm(out, lowered, b_cat.T)  # [n, out]
        return out + (lowered @ b_cat.T).to(out.dtype)  # [n, out]

    def _concat(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """A_cat [R, in], B_cat [out, R] of `slots` and each column's slot (cached until the
        slots' weights change)."""
        key = (tuple(slots), self._version)
        if self._cat is None or self._cat[0] != key:
            used = [s for s in slots if self.ranks[s]]
            a_cat = torch.cat([self.a[s, : self.ranks[s]] for s in used]) if used else None
            b_cat = torch.cat([self.b[s, :, : self.ranks[s]] for s in used], 1) if used else None
            cols = tuple(s for s in used for _ in range(self.ranks[s]))
            self._cat = (key, a_cat, b_cat, cols)
        return self._cat[1], self._cat[2], self._cat[3]


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
