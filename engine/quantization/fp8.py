"""fp8 (e4m3) weights: the quantization math and `Fp8Linear`, the layer that serves them.

A weight W [N, K] is kept as q = round_e4m3(W / s) with float32 scales s, one per output channel
([N], absmax / 448, 448 being e4m3fn's largest finite value) or one per block ([ceil(N/bn),
ceil(K/bk)], the fine-grained format of DeepSeek V3 / transformers' `FineGrainedFP8Config`).
Dequantized: W ~= q * s (the checkpoint formats' convention, see quantization/fp8_checkpoint.py).

Matmuls, per device (probed once per device by `quantizer`):
- CUDA with compute capability >= 8.9 (Ada, Hopper, Blackwell) and `torch._scaled_mm`: the input
  is quantized per token (row absmax / 448, dynamic; one Triton launch, kernels/fp8_kernels.py, or
  torch ops where that kernel does not run) and multiplied on the fp8 tensor cores with
  row-wise scales: x_q [M, K] @ q.T [K, N] (column-major), scale_a [M, 1], scale_b [1, N], bf16
  out (cuBLASLt's row-wise scaling accepts bf16 output only; K and N multiples of 16).
  Block-scaled weights have no row-wise form: `Fp8Linear.per_channel()` re-quantizes them at load
  (see its docstring for the quality cost).
- Elsewhere (CPU, older GPUs, shapes _scaled_mm refuses): weight-only, the weight is dequantized
  to the input's dtype on every call and F.linear runs; memory is fp8's, speed is not.

Longer than ~300 lines on purpose: the two halves of one format (how weights are quantized and
the layer that multiplies by them) share their conventions and are checked against each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("hearth.fp8")

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_MIN_SCALE = 1e-12  # an all-zero row or token still gets a finite, non-zero scale

Quantizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # x -> (x_q, scale)
_PATHS: dict[torch.device, Quantizer | None] = {}  # device -> input quantizer, None: weight-only


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel fp8: weight [N, K] (any float dtype) -> (q float8_e4m3fn [N, K],
    scale float32 [N]) with weight ~= q * scale[:, None]; scale = row absmax / 448.
    Relative error per element is at most 2^-4 (e4m3's 3 mantissa bits, round to nearest)
    for values above e4m3's subnormal range (2^-6 * scale)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=_MIN_SCALE)  # [N]
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)  # [N, K]
    return q, scale


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q [N, K] fp8 and scale [N] (per channel), [] (per tensor) or, with block_size (bn, bk),
    [ceil(N/bn), ceil(K/bk)] -> q * scale as `dtype` [N, K] (computed in float32)."""
    w = q.float()
    if block_size is not None and scale.dim() == 2:
        rows, cols = q.shape
        full = scale.repeat_interleave(block_size[0], 0).repeat_interleave(block_size[1], 1)
        return (w * full[:rows, :cols]).to(dtype)
    if scale.dim() == 0 or scale.numel() == 1:
        return (w * scale.reshape(())).to(dtype)
    return (w * scale.reshape(-1, 1)).to(dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: x [M, K] -> (x_q float8_e4m3fn [M, K], scale float32 [M, 1])."""
    scale = (x.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_matmul(
    x: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    quantize: Quantizer = quantize_activation,
) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32, CUDA) times fp8 q [N, K] with per-channel scale [N] on the fp8
    units, x quantized per token by `quantize`: returns [M, N] in x's dtype. Raises whatever
    torch._scaled_mm raises."""
    x_q, x_scale = quantize(x)
    out = torch._scaled_mm(
        x_q,
        q.t(),  # [K, N], column-major: the layout cuBLASLt's fp8 GEMM wants
        scale_a=x_scale,  # [M, 1]
        scale_b=scale.view(1, -1),  # [1, N]
        out_dtype=torch.bfloat16,
    )
    if isinstance(out, tuple):  # torch < 2.5 returned (out, amax)
        out = out[0]
    out = out.to(x.dtype)
    return out if bias is None else out + bias


def _check_matmul(device: torch.device, quantize: Quantizer) -> float:
    """Relative error of one small scaled_matmul against the weight-only product."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(64, 128, generator=gen).to(device)  # [N, K]
    x = torch.randn(3, 128, generator=gen).to(device, torch.bfloat16)  # [M, K], M odd
    q, s = quantize_weight(w)
    got = scaled_matmul(x, q, s, None, quantize).float()
    want = F.linear(x.float(), dequantize(q, s))
    return (got - want).abs().max().item() / want.abs().max().item()


def _triton_quantizer(device: torch.device) -> tuple[Quantizer | None, str]:
    """engine/kernels/fp8_kernels.py's one-launch quantizer where it runs and agrees with
    quantize_activation to e4m3's rounding (one step of its grid), else (None, why)."""
    try:
        from hearth.engine.kernels.fp8_kernels import quantize_rows

        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(5, 3000, generator=gen) * torch.logspace(-3, 3, 5)[:, None]
        x[1] = 0.0
        x = x.to(device, torch.bfloat16)  # [5, 3000]: two column tiles, the second partial
        got_q, got_scale = quantize_rows(x)
        want_q, want_scale = quantize_activation(x)
        got, want = dequantize(got_q, got_scale[:, 0]), dequantize(want_q, want_scale[:, 0])
        step = want.abs() * 2**-3 + want_scale * 2**-9  # one e4m3 step (or subnormal step)
        close = (got_scale - want_scale).abs() <= want_scale * 1e-6
        if not ((got - want).abs() <= step).all() or not close.all():
            return None, "its result differs from torch's"
        err = _check_matmul(device, quantize_rows)
        return (quantize_rows, "") if err < 0.1 else (None, f"relative error {err:.3f}")
    except Exception as exc:  # no Triton, or a kernel this GPU cannot run
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def quantizer(device: torch.device | str) -> Quantizer | None:
    """How inputs are quantized for the fp8 matmuls on `device`, None where they do not run:
    CUDA, compute capability >= 8.9, torch._scaled_mm present and one small product right
    (else weight-only). The Triton kernel where it runs, else torch ops. Probed once per device
    (call it outside CUDA graph capture); what failed is logged once."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device in _PATHS:
        return _PATHS[device]
    chosen, why = None, "not a CUDA device"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            why = f"compute capability {capability} < (8, 9)"
        elif not hasattr(torch, "_scaled_mm"):
            why = "this torch has no _scaled_mm"
        else:
            try:
                err = _check_matmul(device, quantize_activation)
                chosen = quantize_activation if err < 0.1 else None  # input rounding: ~3%
                why = f"relative error {err:.3f}"
            except Exception as exc:  # an architecture or build cuBLASLt refuses
                why = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        if chosen is None:
            log.warning("fp8 on %s: weight-only (dequantize + matmul): %s", device, why)
        else:
            kernel, why = _triton_quantizer(device)
            chosen = kernel or chosen
            how = "Triton" if kernel else f"torch ops (the Triton kernel: {why})"
            log.info("fp8 matmuls on %s: torch._scaled_mm, row-wise; inputs: %s", device, how)
    _PATHS[device] = chosen
    return chosen


def fast_path(device: torch.device | str) -> bool:
    """Whether fp8 matmuls run on `device`'s fp8 units (see `quantizer`)."""
    return quantizer(device) is not None


class Fp8Linear(nn.Module):
    """A linear layer with fp8 weights: weight float8_e4m3fn [N, K], weight_scale float32 [N]
    (per output channel) or [ceil(N/bn), ceil(K/bk)] with block_size (bn, bk), bias [N] in the
    compute dtype or None. forward(x [..., K]) -> [..., N] in x's dtype."""

    def __init__(
        self,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None = None,
        block_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if weight.dtype != FP8 or weight.dim() != 2:
            raise ValueError(f"Fp8Linear: weight must be float8_e4m3fn [N, K], got {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.block_size = tuple(block_size) if block_size is not None else None
        scale = weight_scale.detach().float()
        if self.block_size is None:
            scale = scale.reshape(-1).expand(self.out_features).contiguous()  # [N]
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self._probed = False
        self._quant: Quantizer | None = None  # the fp8 matmul path's input quantizer

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight q * scale as `dtype` [N, K]."""
        return dequantize(self.weight, self.weight_scale, dtype, self.block_size)

    @torch.no_grad()
    def per_channel(self) -> Fp8Linear:
        """Block scales -> per-channel scales (in place), so the fp8 matmul path can serve it:
        each row is dequantized and re-quantized with the row's absmax. Cost: a second
        rounding (up to 2^-4 relative per element again), and values below the row's absmax
        / 448 * 2^-6 fall into e4m3's subnormals, where their block's smaller scale had kept
        them normal. Measured on a 1024x1024 random weight with outlier input channels
        (bench-style, seed 0): relative RMS error of the weight 2.5% as 128x128 blocks, 3.3%
        converted, 2.0% quantized per channel from the original."""
        if self.block_size is not None:
            q, scale = quantize_weight(self.dequantized())
            self.weight.data, self.weight_scale.data = q, scale
            self.block_size = None
        return self

    def _apply(self, fn, recurse: bool = True):
        """.to(device) moves; a dtype cast of the model (model.to(torch.bfloat16), .half())
        casts the bias only: the weight stays fp8 (e4m3 values survive fp16/bf16 exactly)
        and the scales fp32."""
        scale = self.weight_scale.data
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8:
            self.weight.data = self.weight.data.to(FP8)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale.data = scale.to(self.weight_scale.device)
        return self

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._probed:
            fits = self.block_size is None and _fits(self)
            self._quant, self._probed = quantizer(x.device) if fits else None, True
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self._quant is not None:
            rows = x.reshape(-1, self.in_features)  # [M, K]
            out = scaled_matmul(rows, self.weight, self.weight_scale, bias, self._quant)
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        scales = f"block_size={self.block_size}" if self.block_size else "per-channel scales"
        return f"in_features={self.in_features}, out_features={self.out_features}, {scales}"


def _fits(layer: Fp8Linear) -> bool:
    """_scaled_mm's shape rule: K and N multiples of 16."""
    return layer.in_features % 16 == 0 and layer.out_features % 16 == 0


def skipped(name: str, skip: tuple[str, ...]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts or name.endswith("." + s) for s in skip)


@torch.no_grad()
def quantize_model(module: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> int:
    """Replace every nn.Linear in `module` (its own name, a dotted path component or a dotted
    suffix matching an entry of `skip` excepted) by an Fp8Linear with per-channel scales, in
    place, one layer at a time, freeing each original weight. Works on a whole model or one
    decoder layer (CPU or CUDA; the fp8 path is probed here on CUDA, outside any graph
    capture). Run it before engine/kernels/fusion.py fuses projections. Returns the bytes the fp8
    weights and scales now take (all Fp8Linear layers in `module`, including earlier ones)."""
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if type(child) is nn.Linear and not skipped(name, skip)
    ]
    for name, linear in targets:
        if linear.weight.device.type == "meta":
            raise ValueError(f"quantize_model: {name} has no weights (meta device)")
        fp8 = Fp8Linear.from_linear(linear)
        linear.weight = None  # free the original now: peak memory is one layer's
        _replace(module, name, fp8)
    total = 0
    for layer in module.modules():
        if isinstance(layer, Fp8Linear):
            total += layer.bytes()
            if layer.weight.device.type == "cuda":
                fast_path(layer.weight.device)
    return total


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    if not name:
        raise ValueError("quantize_model: call it on a module that contains the linear layers")
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def fuse(layers: list[Fp8Linear]) -> Fp8Linear:
    """One Fp8Linear over per-channel layers sharing K (q/k/v, gate/up): weights and scales
    concatenated along N; each layer's own tensors become views of the fused ones, so no
    memory is added (see engine/kernels/fusion.py)."""
    weight = torch.cat([layer.weight.detach() for layer in layers])  # [sum N, K]
    scale = torch.cat([layer.weight_scale.detach() for layer in layers])  # [sum N]
    has_bias = layers[0].bias is not None
    bias = torch.cat([layer.bias.detach() for layer in layers]) if has_bias else None
    start = 0
    for layer in layers:
        end = start + layer.out_features
        layer.weight.data, layer.weight_scale.data = weight[start:end], scale[start:end]
        if bias is not None:
            layer.bias.data = bias[start:end]
        start = end
    fused = Fp8Linear(weight, scale, bias)
    fused._probed, fused._quant = layers[0]._probed, layers[0]._quant
    return fused


def fusable(layers: list[nn.Module]) -> bool:
    """Fp8Linear layers that `fuse` can join: per-channel, same K, device and bias presence."""
    if not all(type(layer) is Fp8Linear and layer.block_size is None for layer in layers):
        return False
    first = layers[0]
    return all(
        layer.in_features == first.in_features
        and layer.weight.device == first.weight.device
        and (layer.bias is None) == (first.bias is None)
        for layer in layers
    )
