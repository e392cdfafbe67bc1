"""Runs one scheduled step through the model: packs tokens, owns the paged KV cache tensors."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from engine import distributed
from engine.attention import PagedBatch, Prefill, register
from engine.config import EngineLimits
from engine.cuda_graphs import DecodeGraphs, GraphCaptureError
from engine.fusion import fuse_projections
from engine.scheduler import Scheduled

log = logging.getLogger("hearth.engine")


def kv_shape(model: PreTrainedModel, tp_size: int = 1) -> tuple[int, int, int]:
    """(layers, KV heads on this rank, head dim) of a decoder-only model."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if kv_heads % tp_size:
        raise ValueError(f"{kv_heads} KV heads cannot be split over {tp_size} ranks")
    return cfg.num_hidden_layers, kv_heads // tp_size, head_dim


def kv_bytes_per_token(model: PreTrainedModel, dtype: torch.dtype, tp_size: int = 1) -> int:
    layers, kv_heads, head_dim = kv_shape(model, tp_size)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


@dataclass
class StepInputs:
    """One step's packed tokens and cache addressing (plain lists: cheap to send to other ranks)."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    decode_rows: list[int] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)
    prefills: list[tuple[int, int, int, list[int] | None]] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)


class Kernels(NamedTuple):
    decode: str  # decode attention: "triton" or "cpu" (paged cache in place), "sdpa" (gather)
    graphs: bool  # CUDA graphs for pure decode steps
    fused: bool  # Triton RMSNorm and SiLU * up
    cpu_matmul: bool = False  # C++ matmul over packed weights (CPU, float32)


def choose_kernels(
    limits: EngineLimits, devices: set[torch.device], head_dim: int, tp_size: int = 1
) -> Kernels:
    """What limits ask for, with `auto`/unset (the default) choosing the Triton kernels and CUDA
    graphs on one CUDA device (per rank under tensor parallelism) and the C++ decode kernel on
    CPU, the fastest paths there (docs/benchmarks.md), and SDPA elsewhere: device_map over
    several GPUs, no Triton. `_probe` checks at startup that the auto choices can run.
    Raises ValueError for an explicit choice that cannot run."""
    cuda = all(device.type == "cuda" for device in devices)
    one_gpu = cuda and len(devices) == 1
    on_cpu = all(device.type == "cpu" for device in devices)
    # Triton kernels need CUDA tensors, unless Triton's CPU interpreter runs them (tests).
    runnable = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    kernel = limits.decode_kernel
    if kernel == "auto":
        usable = one_gpu and importlib.util.find_spec("triton") is not None
        if usable and _triton_shape_problem(limits, head_dim) is None:
            kernel = "triton"
        else:
            kernel = "cpu" if on_cpu else "sdpa"
    elif kernel == "cpu" and not on_cpu:
        raise ValueError("decode_kernel cpu needs the model on the CPU")
    elif kernel == "triton":
        if not runnable:
            raise ValueError("decode_kernel triton needs CUDA")
        if problem := _triton_shape_problem(limits, head_dim):
            raise ValueError(problem)
    graphs = limits.cuda_graphs
    if graphs is None:  # not under tensor parallelism: captures there are unverified
        graphs = kernel == "triton" and one_gpu and tp_size == 1
    if graphs and kernel != "triton":
        raise ValueError(
            "cuda_graphs needs the triton decode kernel, which cannot run here (CUDA and Triton)"
        )
    fused = limits.fused_kernels
    if fused is None:  # the fused MLP needs gate and up fused, which TP leaves split
        fused = kernel == "triton" and one_gpu and tp_size == 1
    elif fused and (not runnable or tp_size > 1):
        raise ValueError("fused_kernels needs CUDA and tensor_parallel_size 1")
    cpu_matmul = limits.cpu_matmul
    if cpu_matmul is None:
        cpu_matmul = kernel == "cpu" and tp_size == 1
    elif cpu_matmul and (not on_cpu or tp_size > 1):
        raise ValueError("cpu_matmul needs the model on the CPU and tensor_parallel_size 1")
    return Kernels(kernel, graphs, fused, cpu_matmul)


class _Shapes:
    """The sizes the Triton kernels see on this rank."""

    def __init__(self, model: PreTrainedModel, tp_size: int) -> None:
        cfg = model.config.get_text_config()
        _, self.kv_heads, self.head_dim = kv_shape(model, tp_size)
        self.heads = cfg.num_attention_heads // tp_size
        self.hidden = cfg.hidden_size


def _probe(
    kernels: Kernels, limits: EngineLimits, device: torch.device, dtype: torch.dtype, shape: _Shapes
) -> Kernels:
    """Launch each Triton kernel that `auto` chose once, on tiny inputs of the model's shapes:
    one that cannot run on this GPU (too little shared memory, an old architecture) gives way
    to the PyTorch path, with a warning. Explicit choices are left to fail loudly. The CPU
    kernel is built here (once per machine); without a compiler, or for a dtype other than
    float32, auto falls back to SDPA and an explicit `cpu` is a ValueError."""
    if kernels.decode == "cpu" or kernels.cpu_matmul:
        from engine import cpu_kernels

        problem = "they compute in float32 only" if dtype != torch.float32 else None
        problem = problem or cpu_kernels.problem()
        if problem is not None:
            for name, value in (("decode_kernel", "cpu"), ("cpu_matmul", True)):
                if getattr(limits, name) == value:
                    raise ValueError(f"{name}: the CPU kernels cannot run: {problem}")
            level = logging.INFO if dtype != torch.float32 else logging.WARNING
            log.log(level, "the CPU kernels are not used: %s", problem)
            kernels = kernels._replace(decode="sdpa", cpu_matmul=False)
    if kernels.decode == "triton" and limits.decode_kernel == "auto":
        try:
            from engine.triton_attention import paged_decode

            q = torch.randn(1, shape.heads, shape.head_dim, device=device).to(dtype)  # [1, H, D]
            kv = torch.randn(1, limits.block_size, shape.kv_heads, shape.head_dim, device=device)
            kv = kv.to(dtype)  # [1, bs, Hkv, D]
            ones = torch.ones(1, 1, dtype=torch.int32, device=device)
            paged_decode(q, kv, kv, ones - 1, ones[0], 1.0)
            _sync(device)
        except Exception as exc:
            if limits.cuda_graphs:
                raise
            log.warning("the Triton decode kernel cannot run here, using SDPA: %s", exc)
            kernels = kernels._replace(decode="sdpa", graphs=False)
    if kernels.fused and limits.fused_kernels is None:
        try:
            from engine.fused_ops import rms_norm, silu_mul

            hidden = torch.randn(1, shape.hidden, device=device).to(dtype)  # [1, hidden]
            rms_norm(hidden, hidden[0], 1e-6)
            silu_mul(torch.randn(1, 2048, device=device).to(dtype))
            _sync(device)
        except Exception as exc:
            log.warning("the fused Triton kernels cannot run here: %s", exc)
            kernels = kernels._replace(fused=False)
    return kernels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # a failed launch surfaces here at the latest


def _triton_shape_problem(limits: EngineLimits, head_dim: int) -> str | None:
    from engine.triton_attention import shape_problem

    return shape_problem(limits.block_size, head_dim)


def _layer_devices(model: PreTrainedModel, num_layers: int) -> list[torch.device]:
    """The device of each attention layer (they differ under device_map)."""
    devices: dict[int, torch.device] = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and idx not in devices:
            param = next(module.parameters(), None)
            if param is not None:
                devices[idx] = param.device
    fallback = next(model.parameters()).device
    return [devices.get(i, fallback) for i in range(num_layers)]


class ModelRunner:
    """Owns the KV cache and runs steps. Under tensor parallelism rank 0 (the engine's) sends
    each step's inputs to the other ranks, which run the same forward in `follow()`."""

    def __init__(
        self,
        model: PreTrainedModel,
        num_blocks: int,
        dtype: torch.dtype,
        limits: EngineLimits,
        max_model_len: int,
        tp_size: int = 1,
    ) -> None:
        name = register()
        try:
            model.set_attn_implementation(name)
        except (ValueError, AttributeError):  # older transformers: set the config directly
            model.config._attn_implementation = name
        if tp_size == 1:  # sharded (DTensor) weights stay as transformers split them
            fuse_projections(model)  # one matmul for q/k/v and for gate/up: ~8% faster CPU decode
        self.model = model
        self.tp_size = tp_size
        self.block_size = block_size = limits.block_size
        self.device = next(model.parameters()).device
        layers, kv_heads, head_dim = kv_shape(model, tp_size)
        devices = _layer_devices(model, layers)
        kernels = choose_kernels(limits, set(devices), head_dim, tp_size)
        shapes = _Shapes(model, tp_size)
        self.kernels = kernels = _probe(kernels, limits, self.device, dtype, shapes)
        self.decode_kernel, graphs = kernels.decode, kernels.graphs
        if kernels.fused:
            from engine.fused_ops import patch_model

            patch_model(model)
        if kernels.cpu_matmul:
            from engine.cpu_linear import pack_model

            if packed := pack_model(model):
                log.info("packed %d MiB of linear weights for the CPU matmul", packed >> 20)
            else:
                self.kernels = kernels = kernels._replace(cpu_matmul=False)
        if getattr(model, "hearth_quantization", None) == "gguf":  # engine/gguf_weights.py
            from engine.gguf_linear import route_model

            log.info("small batches on %d MiB of GGUF blocks", route_model(model) >> 20)
        # With CUDA graphs one more block: the scratch block padding rows write to.
        allocated = num_blocks + 1 if graphs else num_blocks
        # Zeroed: padded slots are masked out, but NaN garbage times a zero weight is still NaN.
        self.k_cache = [
            torch.zeros(allocated, block_size, kv_heads, head_dim, dtype=dtype, device=d)
            for d in devices
        ]  # per layer [num_blocks, block_size, Hkv, D]
        self.v_cache = [torch.zeros_like(k) for k in self.k_cache]
        self.graphs = None
        if graphs:
            max_blocks = -(-max_model_len // block_size)
            try:
                self.graphs = DecodeGraphs(
                    self._run_model,
                    self.k_cache,
                    self.v_cache,
                    limits.max_num_seqs,
                    max_blocks,
                    scratch_block=num_blocks,
                )
            except GraphCaptureError as exc:  # a model whose forward cannot be captured
                if limits.cuda_graphs:  # asked for by name: say so at startup
                    raise
                log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
                self.kernels = self.kernels._replace(graphs=False)

    @torch.inference_mode()
    def _run_model(self, kwargs: dict) -> torch.Tensor:
        return self.model(**kwargs).logits[0]  # [n, V]

    def _slots(self, table: list[int], start: int, stop: int) -> list[int]:
        bs = self.block_size
        return [table[p // bs] * bs + p % bs for p in range(start, stop)]

    def execute(self, scheduled: list[Scheduled]) -> torch.Tensor:
        """Run the step; returns logits [n, V] for the items that sample, in schedule order."""
        inputs = self.prepare(scheduled)
        if self.tp_size > 1:
            distributed.broadcast(inputs)
        return self.forward(inputs)

    def follow(self) -> None:
        """Other ranks: run every step rank 0 sends, until it sends None (close())."""
        while (inputs := distributed.broadcast()) is not None:
            self.forward(inputs)

    def close(self) -> None:
        if self.tp_size > 1:
            distributed.broadcast(None)

    def prepare(self, scheduled: list[Scheduled]) -> StepInputs:
        step = StepInputs()
        for item in scheduled:
            seq, start, num = item.seq, item.start, item.num_tokens
            row = len(step.input_ids)
            step.input_ids += seq.tokens(start, start + num)
            step.positions += range(start, start + num)
            step.slot_mapping += self._slots(seq.block_table, start, start + num)
            context = start + num
            if num == 1:
                step.decode_rows.append(row)
                step.decode_tables.append(seq.block_table)
                step.decode_lens.append(context)
            else:
                slots = None if start == 0 else self._slots(seq.block_table, 0, context)
                step.prefills.append((row, num, context, slots))
            if item.samples:
                step.sample_rows.append(row + num - 1)
        return step

    @torch.inference_mode()
    def forward(self, step: StepInputs) -> torch.Tensor:
        pure_decode = not step.prefills and len(step.sample_rows) == len(step.input_ids)
        if self.graphs is not None and pure_decode:
            logits = self.graphs.run(
                step.input_ids,
                step.positions,
                step.slot_mapping,
                step.decode_tables,
                step.decode_lens,
            )
            if logits is not None:
                return logits
        dev = self.device

        def longs(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=dev)

        prefills = [
            Prefill(r, n, c, None if s is None else longs(s)) for r, n, c, s in step.prefills
        ]
        batch = PagedBatch(
            k_cache=self.k_cache,
            v_cache=self.v_cache,
            slot_mapping=longs(step.slot_mapping),
            decode_rows=None,
            decode_tables=None,
            decode_mask=None,
            prefills=prefills,
        )
        if step.decode_rows:
            tables = step.decode_tables
            width = max(len(t) for t in tables)
            lens = longs(step.decode_lens)
            batch.decode_rows = longs(step.decode_rows)
            batch.decode_tables = longs([t + [0] * (width - len(t)) for t in tables])
            if self.decode_kernel == "sdpa":  # the kernels read lens instead of a mask
                mask = (
                    torch.arange(max(step.decode_lens), device=dev)[None, :] < lens[:, None]
                )  # [Bd, L]
                batch.decode_mask = mask[:, None, None, :]
            batch.decode_lens = lens
            batch.decode_kernel = self.decode_kernel
        return self._run_model(
            {
                "input_ids": longs([step.input_ids]),
                "position_ids": longs([step.positions]),
                "use_cache": False,
                "logits_to_keep": longs(step.sample_rows),
                "hearth_batch": batch,
            }
        )
