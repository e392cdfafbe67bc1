"""Attention over the paged KV cache, registered into transformers' attention interface.

The runner packs every scheduled token of a step into one row ([1, T]) and passes a PagedBatch
through the model's kwargs; each attention layer writes its new K/V into the cache slots, then
attends per sequence: decodes together in one padded SDPA call, prefill chunks one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTN_NAME = "hearth_paged"


@dataclass
class Prefill:
    start: int  # first row of this chunk in the packed batch
    length: int  # query tokens in the chunk
    context: int  # tokens attended to (cached prefix + chunk)
    slots: torch.Tensor | None  # [context] cache slots; None when the chunk is the whole context


@dataclass
class PagedBatch:
    k_cache: list[torch.Tensor]  # per layer [num_blocks, block_size, Hkv, D]
    v_cache: list[torch.Tensor]
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes (block * block_size + offset)
    decode_rows: torch.Tensor | None  # [Bd] rows of the packed batch that are single-token decodes
    decode_tables: torch.Tensor | None  # [Bd, nb] block tables of the decodes (padded with 0)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] True where a position is real
    prefills: list[Prefill]
    decode_lens: torch.Tensor | None = None  # [Bd] context lengths (for the Triton kernel)
    decode_kernel: str = "sdpa"  # sdpa: gather blocks + SDPA; triton, cpu: read blocks in place
    cpu_variant: str | None = None  # the C++ kernels' ISA build (engine/kernels/cpu_kernels.py)


def _gather_blocks(blocks: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """Copy whole blocks (contiguous runs) per sequence, trimmed to the longest context.

    blocks: [N, bs, Hkv, D]; tables: [B, nb]. Returns [B, Hkv, length, D].
    """
    batch, per_seq = tables.shape
    picked = blocks.index_select(0, tables.flatten())  # [B * nb, bs, Hkv, D]
    picked = picked.view(batch, per_seq * blocks.shape[1], *blocks.shape[2:])  # [B, nb*bs, Hkv, D]
    return picked[:, :length].transpose(1, 2)


def _causal_mask(length: int, context: int, device: torch.device) -> torch.Tensor:
    """[length, context] True where query i (at position context-length+i) may see key j."""
    rows = torch.arange(length, device=device)[:, None] + (context - length)
    return torch.arange(context, device=device)[None, :] <= rows


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D]
    key: torch.Tensor,  # [1, Hkv, T, D]
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    hearth_batch: PagedBatch | None = None,
    **_: object,
) -> tuple[torch.Tensor, None]:
    batch = hearth_batch
    if batch is None:  # called outside the engine (e.g. generate()): plain SDPA, no paged cache
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    q = query[0].transpose(0, 1)  # [T, H, D]
    new_k = key[0].transpose(0, 1)  # [T, Hkv, D]
    new_v = value[0].transpose(0, 1)
    return attend(module.layer_idx, q, new_k, new_v, batch, scaling)[None], None  # [1, T, H, D]


def attend(
    layer: int,
    q: torch.Tensor,  # [T, H, D]
    new_k: torch.Tensor,  # [T, Hkv, D]
    new_v: torch.Tensor,  # [T, Hkv, D]
    batch: PagedBatch,
    scaling: float | None,
) -> torch.Tensor:
    """Write the step's new K/V of layer `layer` into its cache slots, then attend: every
    decode row in one call, each prefill chunk causally over its context. Returns [T, H, D]
    (rows in the packed batch's order). Used by the patched transformers models and by
    hearth's own forwards (engine/models/)."""
    k_blocks, v_blocks = batch.k_cache[layer], batch.v_cache[layer]  # [N, bs, Hkv, D]
    k_cache, v_cache = k_blocks.flatten(0, 1), v_blocks.flatten(0, 1)  # [N * bs, Hkv, D] views
    slot_mapping = _on(batch.slot_mapping, k_cache.device)  # moves only under device_map
    k_cache.index_copy_(0, slot_mapping, new_k)
    v_cache.index_copy_(0, slot_mapping, new_v)

    decoded = None
    if batch.decode_rows is not None:
        decoded = _decode_attention(batch, q, k_blocks, v_blocks, scaling)  # [Bd, H, D]
        if not batch.prefills:  # a pure decode step: the rows are 0..T-1, in order
            return decoded
    out = torch.empty_like(q)  # [T, H, D]
    if decoded is not None:
        out[batch.decode_rows.to(q.device)] = decoded
    for p in batch.prefills:
        qp = q[p.start : p.start + p.length].transpose(0, 1)[None]  # [1, H, c, D]
        if p.slots is None:  # the chunk is the whole context: use the new K/V directly
            kp = new_k[p.start : p.start + p.length].transpose(0, 1)[None]  # [1, Hkv, c, D]
            vp = new_v[p.start : p.start + p.length].transpose(0, 1)[None]
            op = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            slots = p.slots.to(q.device)
            kp = k_cache[slots].transpose(0, 1)[None]  # [1, Hkv, ctx, D]
            vp = v_cache[slots].transpose(0, 1)[None]
            mask = _causal_mask(p.length, p.context, q.device)
            op = F.scaled_dot_product_attention(
                qp, kp, vp, attn_mask=mask, scale=scaling, enable_gqa=True
            )
        out[p.start : p.start + p.length] = op[0].transpose(0, 1)
    return out


def _decode_attention(
    batch: PagedBatch,
    q: torch.Tensor,  # [T, H, D]
    k_blocks: torch.Tensor,  # [N, bs, Hkv, D]
    v_blocks: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """Every single-token decode of the step in one call. Returns [Bd, H, D]."""
    rows = _on(batch.decode_rows, q.device)
    if batch.decode_kernel in ("triton", "cpu"):
        if batch.decode_kernel == "triton":
            from hearth.engine.kernels.triton_attention import paged_decode
        else:
            from hearth.engine.kernels.cpu_kernels import paged_decode

        qd = q if len(rows) == len(q) else q[rows]  # [Bd, H, D]
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        tables, lens = _on(batch.decode_tables, q.device), _on(batch.decode_lens, q.device)
        if batch.cpu_variant is not None:  # the C++ kernels' ISA build chosen by autotune
            return paged_decode(qd, k_blocks, v_blocks, tables, lens, scale, batch.cpu_variant)
        return paged_decode(qd, k_blocks, v_blocks, tables, lens, scale)
    tables = batch.decode_tables.to(q.device)
    mask = batch.decode_mask.to(q.device)  # [Bd, 1, 1, L]
    kd = _gather_blocks(k_blocks, tables, mask.shape[-1])  # [Bd, Hkv, L, D]
    vd = _gather_blocks(v_blocks, tables, mask.shape[-1])
    # The G query heads sharing a KV head become G query rows of that head: no KV repeat.
    heads, kv_heads, dim = q.shape[1], kd.shape[1], q.shape[2]
    qd = (q if len(rows) == len(q) else q[rows]).view(-1, kv_heads, heads // kv_heads, dim)
    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scaling)
    return od.reshape(-1, heads, dim)


def _on(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; no dispatch when it is there already (a decode step asks ~6 times
    per layer)."""
    return tensor if tensor.device == device else tensor.to(device)


def register() -> str:
    """Make `hearth_paged` a transformers attention implementation (idempotent).

    No mask function is registered with it, so transformers builds no mask at all (the attention
    masks from the batch layout itself) and skips its packed-sequence check, a host sync per step.
    """
    AttentionInterface.register(ATTN_NAME, paged_attention)
    return ATTN_NAME
