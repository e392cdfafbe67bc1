"""Putting kernels into a loaded model: the paged attention implementation and fused projections
once at start (`prepare_model`), then for each kernel choice its forwards patched or restored
and weights packed (`patch_forwards`), and CUDA graphs captured (`capture_decode_graphs`).

The Triton modules are imported only when their kernels are applied (Triton is optional).
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from hearth.engine.config import EngineSettings
from hearth.engine.kernels.attention import register
from hearth.engine.kernels.cuda_graphs import DecodeGraphs, Forward, GraphCaptureError
from hearth.engine.kernels.fusion import fuse_projections, reattach_groups, restore_forwards
from hearth.engine.kernels.selection import Kernels
from hearth.engine.kv_cache import KVCache

log = logging.getLogger("hearth.engine")


def prepare_model(model: PreTrainedModel, tp_size: int = 1) -> None:
    """Run attention through the paged KV cache (engine/kernels/attention.py) and, without
    tensor parallelism, fuse q/k/v and gate/up into one matmul each (~8% faster CPU decode).
    Sharded (DTensor) weights stay as transformers split them."""
    name = register()
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):  # older transformers: set the config directly
        model.config._attn_implementation = name
    if tp_size == 1:
        fuse_projections(model)
        if next(model.parameters()).is_cuda:  # the unfused weights' blocks, before the KV
            torch.cuda.empty_cache()  # cache and graph pools (a 70B bf16 leaves little)


def needs_patch(current: Kernels | None, kernels: Kernels) -> bool:
    """Whether switching from `current` (None: unknown, e.g. a patch that failed half way) to
    `kernels` changes the model's forwards or weights (fused ops, CPU matmul and its build,
    GGUF routing); decode attention, graphs and threads switch without it."""
    patched = (kernels.fused, kernels.cpu_matmul, kernels.cpu_variant, kernels.gguf)
    return current is None or (*current[2:5], current.gguf) != patched


def patch_forwards(
    model: PreTrainedModel, kernels: Kernels, log_packing: bool = False, final: bool = False
) -> Kernels:
    """The model's forwards for `kernels`: restored, then fused kernels patched in and the
    weights packed for the CPU matmul (off when the copies would not fit in memory), then GGUF
    layers routed to their own blocks at small batches. Returns what was applied (`cpu_matmul`
    False where packing did not fit). `log_packing`: log the MiB packed and routed. `final`:
    the choice is made (not an autotune trial): the packing may drop the float32 originals
    (kernels/cpu_linear.py)."""
    restore_forwards(model)
    reattach_groups(model)
    if kernels.fused:
        from hearth.engine.kernels.fused_ops import patch_model

        patch_model(model)
    if kernels.cpu_matmul:
        from hearth.engine.kernels.cpu_linear import pack_model

        if packed := pack_model(model, variant=kernels.cpu_variant, final=final):
            if log_packing:
                log.info("packed %d MiB of linear weights for the CPU matmul", packed >> 20)
        else:
            kernels = kernels._replace(cpu_matmul=False)
    if kernels.gguf:  # after the packing: above its row limit a layer runs what it had
        from hearth.engine.quantization.gguf_linear import route_model

        routed = route_model(model)
        if log_packing:
            log.info("small batches on %d MiB of GGUF blocks", routed >> 20)
    return kernels


def capture_decode_graphs(
    forward: Forward,
    kv_cache: KVCache,
    settings: EngineSettings,
    max_model_len: int,
    sizes: list[int] | None = None,
) -> DecodeGraphs | None:
    """CUDA graphs of pure decode steps over `kv_cache` for batch sizes `sizes` (default: every
    bucket up to settings.max_num_seqs), tables wide enough for `max_model_len` tokens. None,
    with a warning, when the model's forward cannot be captured; raises GraphCaptureError
    instead when settings.cuda_graphs asked for graphs by name."""
    max_blocks = -(-max_model_len // kv_cache.block_size)
    try:
        return DecodeGraphs(
            forward,
            kv_cache.k_cache,
            kv_cache.v_cache,
            settings.max_num_seqs,
            max_blocks,
            scratch_block=kv_cache.scratch_block,
            sizes=sizes,
        )
    except GraphCaptureError as exc:  # a model whose forward cannot be captured
        if settings.cuda_graphs:  # asked for by name: say so at startup
            raise
        log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
        return None
