"""The GPU kernels proven on CPU where they can be: the paged decode kernel across several of its
64-token tiles (Triton's interpreter, float32, against float64 attention), and every Triton
kernel of engine/kernels/ through Triton's CUDA compiler for sm_90 (no GPU needed: the
interpreter accepts code the compiler refuses)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fixtures.server import ROOT

triton = pytest.importorskip("triton")

# Contexts on both sides of the tile edges (64, 128, 192 tokens: TILE_TOKENS), one a single
# token, the longest spanning 5 tiles; block sizes 16 (4 blocks a tile), 32, and 128 (a tile
# of one block: TILE = block_size). Block tables are a random permutation of the cache's blocks.
MULTI_TILE_CHECK = """
import torch
from hearth.engine.kernels.triton_attention import TILE_TOKENS, paged_decode
assert TILE_TOKENS == 64
torch.manual_seed(0)
lens = torch.tensor([1, 63, 64, 65, 127, 128, 129, 200, 300])
H, Hkv, D = 8, 2, 32
for bs in (16, 32, 128):
    per_seq = -(-int(lens.max()) // bs)
    blocks = len(lens) * per_seq + 2
    tables = torch.randperm(blocks)[: len(lens) * per_seq].view(len(lens), per_seq)
    k = torch.randn(blocks, bs, Hkv, D)
    v = torch.randn(blocks, bs, Hkv, D)
    # Scores spread wide (scale 1): a late tile's maximum rescales the earlier tiles' sums.
    q = torch.randn(len(lens), H, D) * 2
    out = paged_decode(q, k, v, tables, lens, 1.0)  # [B, H, D] float32
    worst = 0.0
    for b, length in enumerate(lens.tolist()):
        pos = torch.arange(length)
        slots = tables[b, pos // bs] * bs + pos % bs
        kk = k.flatten(0, 1)[slots].double().repeat_interleave(H // Hkv, 1)  # [L, H, D]
        vv = v.flatten(0, 1)[slots].double().repeat_interleave(H // Hkv, 1)
        weights = torch.softmax(torch.einsum("hd,lhd->hl", q[b].double(), kk), -1)
        ref = torch.einsum("hl,lhd->hd", weights, vv)  # [H, D] float64
        err = ((out[b].double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, (bs, length, err)
        worst = max(worst, err)
    print(f"block size {bs}: worst relative error {worst:.1e}")
print("multi-tile ok")
"""


def interpret(script: str) -> str:
    """`script` in a fresh Python under Triton's CPU interpreter; its stdout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "HEARTH_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_paged_decode_across_tiles_matches_float64() -> None:
    assert "multi-tile ok" in interpret(MULTI_TILE_CHECK)


def hopper_compile(kernel, signature: dict, constexprs: dict):
    """`kernel` compiled by Triton's CUDA backend for sm_90 (skips where this Triton cannot:
    no ASTSource / GPUTarget, or no ptxas beside it)."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ASTSource / GPUTarget")
    signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
    source = ASTSource(kernel, signature, constexprs=constexprs)
    try:
        return triton.compile(source, target=GPUTarget("cuda", 90, 32))
    except (RuntimeError, FileNotFoundError) as exc:
        if "ptxas" not in str(exc):
            raise
        pytest.skip(f"no ptxas: {exc}")


def paged_decode_case(dtype: str, precision: str, block_size: int):
    from hearth.engine.kernels.triton_attention import TILE_TOKENS, _paged_decode_kernel

    pointer = f"*{dtype}"
    signature = {
        "q_ptr": pointer,
        "k_ptr": pointer,
        "v_ptr": pointer,
        "tables_ptr": "*i32",
        "lens_ptr": "*i32",
        "out_ptr": pointer,
        "scale": "fp32",
        **dict.fromkeys(
            ("stride_qb", "stride_qh", "stride_kn", "stride_ks", "stride_kh", "stride_tb"), "i32"
        ),
    }
    constexprs = {  # Llama-3-8B's layer: 32 heads over 8 KV heads, head size 128
        "GROUP": 4,
        "BLOCK_G": 16,
        "BLOCK_SIZE": block_size,
        "TILE": max(block_size, TILE_TOKENS),
        "HEAD_DIM": 128,
        "PRECISION": precision,
    }
    return _paged_decode_kernel, signature, constexprs


def rms_norm_case(dtype: str):
    from hearth.engine.kernels.fused_ops import _rms_norm_kernel

    signature = {"x_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"}
    signature |= {"size": "i32", "eps": "fp32"}
    return _rms_norm_kernel, signature, {"BLOCK": 4096}


def silu_mul_case(dtype: str):
    from hearth.engine.kernels.fused_ops import _silu_mul_kernel

    signature = {"gu_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "size": "i32"}
    return _silu_mul_kernel, signature, {"BLOCK": 1024}


def quant_rows_case(dtype: str):
    from hearth.engine.kernels.fp8_kernels import _quant_rows_kernel

    signature = {"x_ptr": f"*{dtype}", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32", "K": "i32"}
    return _quant_rows_kernel, signature, {"BLOCK": 2048, "DIV_RN": True}


HOPPER_CASES = {
    "paged_decode bf16 bs16": lambda: paged_decode_case("bf16", "tf32", 16),
    "paged_decode fp16 bs128": lambda: paged_decode_case("fp16", "tf32", 128),
    "paged_decode fp32 bs16": lambda: paged_decode_case("fp32", "ieee", 16),
    "rms_norm bf16": lambda: rms_norm_case("bf16"),
    "rms_norm fp32": lambda: rms_norm_case("fp32"),
    "silu_mul bf16": lambda: silu_mul_case("bf16"),
    "quant_rows bf16": lambda: quant_rows_case("bf16"),
}


def test_every_triton_kernel_is_covered() -> None:
    """A new @triton.jit kernel in engine/kernels/ must join HOPPER_CASES."""
    import re

    found = set()
    for path in (ROOT / "engine" / "kernels").glob("*.py"):
        found |= set(re.findall(r"@triton\.jit\s+def (\w+)", path.read_text()))
    covered = {case()[0].fn.__name__ for case in HOPPER_CASES.values()}
    assert found == covered, f"compiled for sm_90: {sorted(covered)}; in engine/kernels/: {found}"


@pytest.mark.parametrize("case", sorted(HOPPER_CASES))
def test_kernel_compiles_for_hopper(case: str) -> None:
    compiled = hopper_compile(*HOPPER_CASES[case]())
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx
    if case.startswith("paged_decode") and "fp32" not in case:
        assert "mma" in ptx  # tl.dot on tensor cores
    if case.startswith("quant_rows"):
        assert "cvt.rn.satfinite.e4m3x2" in ptx and "div.rn.f32" in ptx
