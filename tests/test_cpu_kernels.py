"""The C++ CPU kernels against float64 references, and how the engine picks and drops them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from engine import cpu_kernels
from engine.config import EngineLimits
from engine.cpu_linear import pack_model
from engine.fusion import fuse_projections, restore_forwards
from engine.runner import ModelRunner


def reference_decode(q, k_blocks, v_blocks, tables, lens, scale):
    """float64 attention of q [B, H, D] over each sequence's first lens[b] cached tokens."""
    bs, kv_heads = k_blocks.shape[1], k_blocks.shape[2]
    group = q.shape[1] // kv_heads
    out = []
    for b, n in enumerate(lens.tolist()):
        blocks = tables[b, : -(-n // bs)]
        k = k_blocks[blocks].flatten(0, 1)[:n].double()  # [n, Hkv, D]
        v = v_blocks[blocks].flatten(0, 1)[:n].double()
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [n, H, D]
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block"), [(9, 3, 64, 16), (4, 4, 40, 8)])
def test_paged_decode_matches_float64(heads, kv_heads, dim, block) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks, batch, per_seq = 64, 7, 6
    k_blocks = torch.randn(blocks, block, kv_heads, dim, generator=gen)
    v_blocks = torch.randn(blocks, block, kv_heads, dim, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    lens = torch.tensor([1, block, block + 1, 3 * block - 1, per_seq * block, 2, 29])
    q = torch.randn(batch, heads, dim, generator=gen)
    got = cpu_kernels.paged_decode(q, k_blocks, v_blocks, tables, lens, 0.3)
    want = reference_decode(q, k_blocks, v_blocks, tables, lens, 0.3)
    assert (got.double() - want).abs().max() < 1e-5


def test_paged_decode_refuses_out_of_range_addresses() -> None:
    kv = torch.zeros(4, 8, 1, 16)
    q = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="out of range"):  # longer than the table covers
        cpu_kernels.paged_decode(q, kv, kv, torch.tensor([[0]]), torch.tensor([9]), 1.0)
    with pytest.raises(ValueError, match="out of range"):  # a block that does not exist
        cpu_kernels.paged_decode(q, kv, kv, torch.tensor([[4]]), torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.paged_decode(q.double(), kv, kv, torch.tensor([[0]]), torch.tensor([1]), 1.0)


@pytest.mark.parametrize(("rows", "inner", "out"), [(1, 576, 960), (13, 64, 48), (33, 100, 16)])
def test_linear_matches_float64_and_is_batch_invariant(rows, inner, out) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(out, inner, generator=gen), torch.randn(out, generator=gen)
    x = torch.randn(2, rows, inner, generator=gen)
    packed = cpu_kernels.pack_weight(weight)
    want = F.linear(x.double(), weight.double(), bias.double())
    got = cpu_kernels.linear(x, packed, bias)
    assert got.shape == (2, rows, out)
    assert (got.double() - want).abs().max() < 1e-3
    without_bias = cpu_kernels.linear(x, packed, None)
    assert (without_bias.double() - (want - bias.double())).abs().max() < 1e-3
    # A row's result is the same whatever else is in the batch, to the last bit.
    assert torch.equal(cpu_kernels.linear(x[0, -1:], packed, bias)[0], got[0, -1])


def test_pack_weight_needs_whole_panels() -> None:
    with pytest.raises(ValueError, match="cannot pack"):
        cpu_kernels.pack_weight(torch.zeros(20, 8))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def test_packed_model_computes_the_same_logits() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        stock = model(ids).logits
        fuse_projections(model)
        assert pack_model(model) > 0
        packed = model(ids).logits
        assert model.model.embed_tokens.weight is model.lm_head.weight  # the tie survives
        restore_forwards(model)
        restored = model(ids).logits
    assert (packed - stock).abs().max() < 1e-4
    assert torch.equal(restored, stock)


def runner(limits: dict) -> ModelRunner:
    return ModelRunner(tiny_llama(), 16, torch.float32, EngineLimits(**limits), 64)


def test_without_measuring_the_engine_keeps_pytorchs_paths_on_cpu() -> None:
    assert runner({"autotune": "off"}).kernels[::3] == ("sdpa", False)


def test_explicit_kernels_run_without_measuring() -> None:
    limits = {"autotune": "off", "decode_kernel": "cpu", "cpu_matmul": True}
    assert runner(limits).kernels[::3] == ("cpu", True)


def test_without_a_compiler_auto_falls_back_and_explicit_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert "no C++ compiler" in cpu_kernels.problem()
    with caplog.at_level(logging.WARNING, logger="hearth.engine"):
        assert runner({}).kernels[::3] == ("sdpa", False)
    assert "CPU kernels are not used" in caplog.text
    with pytest.raises(ValueError, match="decode_kernel: the CPU kernels cannot run"):
        runner({"decode_kernel": "cpu"})
    with pytest.raises(ValueError, match="cpu_matmul: the CPU kernels cannot run"):
        runner({"decode_kernel": "sdpa", "cpu_matmul": True})


def test_other_dtypes_keep_the_pytorch_path() -> None:
    model = tiny_llama().to(torch.bfloat16)
    kernels = ModelRunner(model, 16, torch.bfloat16, EngineLimits(), 64).kernels
    assert kernels[::3] == ("sdpa", False)
