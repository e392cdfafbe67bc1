"""Fuse sibling projections (q/k/v, gate/up) into one matmul without changing modeling code.

The first projection of a group runs the fused matmul and keeps the other slices; its siblings
return them when called with the very same input tensor (and compute normally otherwise). The
original weights become views of the fused one, so no memory is added.
"""

from __future__ import annotations

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
        self.weight, self.bias = weight, bias
        start = 0
        for layer, size in zip(layers, self.sizes, strict=True):
            layer.weight = nn.Parameter(weight[start : start + size], requires_grad=False)
            if bias is not None:
                layer.bias = nn.Parameter(bias[start : start + size], requires_grad=False)
            start += size

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


def restore_forwards(model: nn.Module) -> None:
    """Back to the modules' own forwards (the stock model, for comparisons); fused weights
    stay in place, their values unchanged. Hooks others installed (accelerate's) are kept."""
    for module in model.modules():
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
