"""A Triton kernel for decode attention that reads the paged KV cache in place (no gather).

One program per (sequence, KV head): it loads the G query heads that share the KV head, walks the
sequence's context TILE tokens at a time (each token's block looked up in the block table) with an
online softmax, and writes [G, D]. The context length is read from memory, so the launch has
fixed shapes (CUDA-graph friendly).
Checked against the gather + SDPA path in Triton's interpreter on CPU
(tests/engine/test_triton_attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hearth.engine.kernels.devices import on_device

TILE_TOKENS = 64  # context tokens each iteration reads: several blocks, more loads in flight


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
    TILE: tl.constexpr,  # context tokens per iteration: a multiple of BLOCK_SIZE
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input precision: "ieee" keeps float32 exact
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
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
    for start in range(0, length, TILE):
        t = start + tl.arange(0, TILE)  # [TILE] context positions
        real = t < length
        # Each position's block (64-bit: big caches), then its row inside the block.
        block = tl.load(tables_ptr + seq * stride_tb + t // BLOCK_SIZE, mask=real, other=0)
        rows = block.to(tl.int64) * stride_kn + (t % BLOCK_SIZE) * stride_ks
        offsets = rows[:, None] + kv_head * stride_kh + d[None, :]  # [TILE, D]
        k = tl.load(k_ptr + offsets, mask=real[:, None], other=0.0)
        v = tl.load(v_ptr + offsets, mask=real[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)  # [G, TILE]
        scores = tl.where(real[None, :], scores * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        correction = tl.exp(m - m_new)
        total = total * correction + tl.sum(p, 1)
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # [G, D]
        acc = acc * correction[:, None] + pv.to(tl.float32)
        m = m_new
    out = acc / total[:, None]
    tl.store(
        out_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=(g < GROUP)[:, None],
    )


def shape_problem(block_size: int, head_dim: int) -> str | None:
    """Why the kernel cannot tile this cache, or None: it needs a power-of-two KV block of at
    least 16 tokens and a power-of-two head size."""
    if block_size < 16 or block_size & (block_size - 1):
        return f"decode_kernel triton needs block_size a power of two >= 16, not {block_size}"
    if head_dim < 16 or head_dim & (head_dim - 1):
        return f"decode_kernel triton needs a power-of-two head size >= 16, not {head_dim}"
    return None


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
    # The kernel addresses K and V with K's strides, along a unit last stride.
    assert v_blocks.stride() == k_blocks.stride() and k_blocks.stride(-1) == 1
    q = q.contiguous()
    out = torch.empty_like(q)
    tables = tables.to(torch.int32).contiguous()
    lens = lens.to(torch.int32).contiguous()
    with on_device(q):
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
            TILE=max(block_size, TILE_TOKENS),
            HEAD_DIM=dim,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        )
    return out
