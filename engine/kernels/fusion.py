"""Fuse sibling projections (q/k/v, gate/up) into one matmul without changing modeling code.

The first projection of a group runs the fused matmul and keeps the other slices; its siblings
return them when called with the very same input tensor (and compute normally otherwise). The
original weights become views of the fused one, so no memory is added.

A kernel that holds its own layout of a weight may drop the original (`set_weight` with a
zero-stride stand-in and a rebuild function, kernels/cpu_linear.py); `restore_forwards` puts
the rebuilt originals back with the stock forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _FusedGroup:
    def __init__(self, layers: list[nn.Module]) -> None:
        self.sizes = [layer.out_features for layer in layers]
        self.layers = layers
        if type(layers[0]) is not nn.Linear:  # fp8 layers: one Fp8Linear over the group
            from hearth.engine.quantization.fp8 import fuse

            fused = fuse(layers)
            self.weight, self.bias = fused.weight, fused.bias  # fp8 [sum(out), in]; scales in fused
            self._stock = fused  # type: ignore[method-assign]
        else:
            self._fuse_linear(layers)
        layers[0]._hearth_group = self
        self._hearth_rebuild: Callable[[], torch.Tensor] | None = None  # set: the weight dropped
        self.attach()

    def attach(self) -> None:
        """(Re)install the group's forwards, with the stock matmul as its projection."""
        self._input: torch.Tensor | None = None
        self._pending: list[torch.Tensor | None] = [None] * len(self.layers)
        self.project = self._stock  # x [.., in] -> [.., sum(out)]; cpu_linear may replace it
        set_forward(self.layers[0], self._first)
        for index, layer in enumerate(self.layers[1:], start=1):
            set_forward(layer, self._sibling(index, layer))

    def _fuse_linear(self, layers: list[nn.Module]) -> None:
        weight = torch.cat([layer.weight.detach() for layer in layers])  # [sum(out), in]
        biases = [layer.bias for layer in layers]
        bias = torch.cat([b.detach() for b in biases]) if biases[0] is not None else None
        self.bias = bias
        if bias is not None:
            for layer, part in zip(layers, bias.split(self.sizes), strict=True):
                layer.bias = nn.Parameter(part, requires_grad=False)
        self.set_weight(weight)

    def set_weight(self, weight: torch.Tensor) -> None:
        """The group's weight [sum(out), in]; the layers' weights become its row slices."""
        self.weight = weight
        for layer, part in zip(self.layers, weight.split(self.sizes), strict=True):
            layer.weight = nn.Parameter(part, requires_grad=False)

    def _stock(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.project(x).split(self.sizes, dim=-1)
        self._input = x
        self._pending = [None, *parts[1:]]
        return parts[0]

    def _sibling(self, index: int, layer: nn.Module):
        alone = type(layer).forward.__get__(layer)  # the class's forward: Linear's or Fp8Linear's

        def forward(x: torch.Tensor) -> torch.Tensor:
            part = self._pending[index]
            if part is None or x is not self._input:  # not called as a group: compute alone
                if self._hearth_rebuild is not None:  # original dropped: the group's matmul, sliced
                    return self.project(x).split(self.sizes, dim=-1)[index]
                return alone(x)
            self._pending[index] = None
            if not any(p is not None for p in self._pending):
                self._input = None
            return part

        return forward


def set_forward(module: nn.Module, forward) -> None:
    """Give one module instance its own forward, marked as hearth's (see restore_forwards)."""
    module.forward = forward
    module._hearth_forward = True


def set_weight(owner, weight: torch.Tensor, rebuild: Callable[[], torch.Tensor] | None) -> None:
    """Replace the weight of `owner` (an nn.Linear or a fused group); `rebuild` (None: the
    weight is the original) returns the original when restore_forwards needs it back."""
    if isinstance(owner, _FusedGroup):
        owner.set_weight(weight)
    else:
        owner.weight = nn.Parameter(weight, requires_grad=False)
    owner._hearth_rebuild = rebuild


def restore_forwards(model: nn.Module) -> None:
    """Back to the modules' own forwards and original weights (the stock model, for
    comparisons); fused weights stay in place, their values unchanged. Hooks others installed
    (accelerate's) are kept."""
    for module in model.modules():
        for owner in (module, module.__dict__.get("_hearth_group")):
            if getattr(owner, "_hearth_rebuild", None) is not None:
                set_weight(owner, owner._hearth_rebuild(), None)
        if module.__dict__.pop("_hearth_forward", False):
            module.__dict__.pop("forward", None)


def reattach_groups(model: nn.Module) -> int:
    """After restore_forwards: the fused groups' forwards back in place (no weights copied), each
    with the stock matmul. Returns how many groups there are."""
    count = 0
    for module in model.modules():
        group = module.__dict__.get("_hearth_group")
        if group is not None:
            group.attach()
            count += 1
    return count


def _fusable(layers: list[nn.Module]) -> bool:
    if type(layers[0]).__name__ == "Fp8Linear":
        from hearth.engine.quantization.fp8 import fusable

        return fusable(layers)
    if not all(type(layer) is nn.Linear for layer in layers):
        return False
    first = layers[0].weight
    return all(
        layer.in_features == layers[0].in_features
        and layer.weight.device == first.device
        and layer.weight.dtype == first.dtype
        and (layer.bias is None) == (layers[0].bias is None)
        for layer in layers
    )


@torch.no_grad()
def fuse_projections(model: nn.Module) -> int:
    """Fuse every q/k/v and gate/up group found; returns how many groups were fused."""
    fused = 0
    for module in model.modules():
        for names in GROUPS:
            layers = [getattr(module, name, None) for name in names]
            if all(layer is not None for layer in layers) and _fusable(layers):
                _FusedGroup(layers)
                fused += 1
    return fused
