"""A Triton kernel for decode attention that reads the paged KV cache in place (no gather).

One program per (sequence, KV head): it loads the G query heads that share the KV head, walks the
sequence's block table up to its context length with an online softmax, and writes [G, D]. The
context length is read from memory, so the launch has fixed shapes (CUDA-graph friendly).
Checked against the gather + SDPA path in Triton's interpreter on CPU (tests/test_triton_attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_ptr,  # [N, bs, Hkv, D]
    v_ptr,
    tables_ptr,  # [B, nb] int32
    lens_ptr,  # [B] int32
    out_ptr,  # [B, H, D]
    scale,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kh,
    stride_tb,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_G: tl.constexpr,  # GROUP rounded up (tl.dot needs >= 16)
    BLOCK_SIZE: tl.constexpr,  # KV block size
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    s = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=(g < GROUP)[:, None],
        other=0.0,
    )  # [G, D]
    length = tl.load(lens_ptr + seq)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for j in range(0, tl.cdiv(length, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_tb + j).to(tl.int64)  # big caches: 64-bit
        offsets = block * stride_kn + s[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + offsets)  # [bs, D]
        v = tl.load(v_ptr + offsets)
        scores = tl.dot(q, tl.trans(k)).to(tl.float32) * scale  # [G, bs]
        scores = tl.where((j * BLOCK_SIZE + s)[None, :] < length, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        correction = tl.exp(m - m_new)
        total = total * correction + tl.sum(p, 1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m = m_new
    out = acc / total[:, None]
    tl.store(
        out_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(g < GROUP)[:, None],
    )


def check_shape(block_size: int, head_dim: int) -> None:
    """The kernel tiles a KV block and a head: both powers of two, the block at least 16."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"decode_kernel triton needs block_size a power of two >= 16, not {block_size}"
        )
    if head_dim & (head_dim - 1):
        raise ValueError(f"decode_kernel triton needs a power-of-two head size, not {head_dim}")


def paged_decode(
    q: torch.Tensor,  # [B, H, D]
    k_blocks: torch.Tensor,  # [N, bs, Hkv, D]
    v_blocks: torch.Tensor,
    tables: torch.Tensor,  # [B, nb] int32 or int64
    lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:
    """Decode attention of B single-token queries over their paged context. Returns [B, H, D]."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_blocks.shape
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = tables.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    _paged_decode_kernel[(batch, kv_heads)](
        q,
        k_blocks,
        v_blocks,
        tables,
        lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_blocks.stride(0),
        k_blocks.stride(1),
        k_blocks.stride(2),
        tables.stride(0),
        GROUP=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size,
        HEAD_DIM=dim,
    )
    return out
