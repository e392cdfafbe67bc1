"""The C++ CPU kernels, every ISA variant this CPU runs, against float64 references; which
variants a CPU gets; and how the engine picks and drops them."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from hearth.engine.config import EngineSettings
from hearth.engine.kernels import cpu_kernels
from hearth.engine.kernels.cpu_linear import pack_model
from hearth.engine.kernels.fusion import fuse_projections, restore_forwards
from hearth.engine.runner import ModelRunner


def runnable(name: str) -> str:
    """The variant's name, or a pytest skip when this CPU (or compiler) cannot run it."""
    if name not in cpu_kernels.variants():
        pytest.skip(f"this CPU cannot run the {name} kernels")
    if (problem := cpu_kernels.problem(name)) is not None:
        pytest.skip(f"{name}: {problem}")
    return name


@pytest.fixture(params=list(cpu_kernels.VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return runnable(request.param)


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
def test_paged_decode_matches_float64(heads, kv_heads, dim, block, variant) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks, batch, per_seq = 64, 7, 6
    k_blocks = torch.randn(blocks, block, kv_heads, dim, generator=gen)
    v_blocks = torch.randn(blocks, block, kv_heads, dim, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: batch * per_seq].view(batch, per_seq)
    lens = torch.tensor([1, block, block + 1, 3 * block - 1, per_seq * block, 2, 29])
    q = torch.randn(batch, heads, dim, generator=gen)
    got = cpu_kernels.paged_decode(q, k_blocks, v_blocks, tables, lens, 0.3, variant)
    want = reference_decode(q, k_blocks, v_blocks, tables, lens, 0.3)
    assert (got.double() - want).abs().max() < 1e-5
    # Each sequence alone gives its batch row, to the last bit.
    one = slice(-2, -1)
    alone = cpu_kernels.paged_decode(
        q[one], k_blocks, v_blocks, tables[one], lens[one], 0.3, variant
    )
    assert torch.equal(alone, got[one])


def test_paged_decode_refuses_out_of_range_addresses() -> None:
    kv = torch.zeros(4, 8, 1, 16)
    q = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="out of range"):  # longer than the table covers
        cpu_kernels.paged_decode(q, kv, kv, torch.tensor([[0]]), torch.tensor([9]), 1.0)
    with pytest.raises(ValueError, match="out of range"):  # a block that does not exist
        cpu_kernels.paged_decode(q, kv, kv, torch.tensor([[4]]), torch.tensor([1]), 1.0)
    with pytest.raises(ValueError, match="float32"):
        cpu_kernels.paged_decode(q.double(), kv, kv, torch.tensor([[0]]), torch.tensor([1]), 1.0)


@pytest.mark.parametrize(
    ("rows", "inner", "out"),
    [
        (1, 576, 960),
        (2, 64, 32),
        (3, 40, 48),
        (5, 64, 80),
        (7, 33, 16),
        (13, 64, 48),
        (33, 100, 16),
    ],
)
def test_linear_matches_float64_and_is_batch_invariant(rows, inner, out, variant) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(out, inner, generator=gen), torch.randn(out, generator=gen)
    x = torch.randn(2, rows, inner, generator=gen)  # [2, M, K]
    packed = cpu_kernels.pack_weight(weight)  # [N/16, K, 16]
    want = F.linear(x.double(), weight.double(), bias.double())
    got = cpu_kernels.linear(x, packed, bias, variant)  # [2, M, N]
    assert got.shape == (2, rows, out)
    assert (got.double() - want).abs().max() < 1e-3
    without_bias = cpu_kernels.linear(x, packed, None, variant)
    assert (without_bias.double() - (want - bias.double())).abs().max() < 1e-3
    # A row's result is the same whatever else is in the batch, to the last bit.
    flat = x.flatten(0, 1)  # [2M, K]
    for row in {0, rows - 1, rows, 2 * rows - 1}:
        alone = cpu_kernels.linear(flat[row : row + 1], packed, bias, variant)[0]
        assert torch.equal(alone, got.flatten(0, 1)[row])
    middle = cpu_kernels.linear(flat[1:-1], packed, bias, variant)  # other tile boundaries
    assert torch.equal(middle, got.flatten(0, 1)[1:-1])


def test_avx512_and_avx2_give_the_same_bits() -> None:
    """The same FMA chain per output in both builds: switching variants changes no result."""
    runnable("avx512"), runnable("avx2")
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(96, 200, generator=gen), torch.randn(96, generator=gen)
    x = torch.randn(19, 200, generator=gen)  # [M, K]
    packed = cpu_kernels.pack_weight(weight)
    assert torch.equal(
        cpu_kernels.linear(x, packed, bias, "avx512"), cpu_kernels.linear(x, packed, bias, "avx2")
    )


AVX2_ONLY = frozenset({"sse2", "ssse3", "sse4_1", "sse4_2", "avx", "f16c", "fma", "bmi2", "avx2"})


def test_variants_follow_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: "/usr/bin/g++")
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: AVX2_ONLY)
    assert cpu_kernels.variants() == ["avx2", "generic"]
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: AVX2_ONLY | {"avx512f", "avx512vl"})
    assert cpu_kernels.variants() == ["avx2", "generic"]  # avx512bw missing
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: AVX2_ONLY - {"fma"})
    assert cpu_kernels.variants() == ["generic"]
    everything = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl"}
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: everything)
    assert cpu_kernels.variants() == ["avx512", "avx2", "generic"]
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert cpu_kernels.variants() == []


def test_an_isa_the_cpu_lacks_is_never_built_nor_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: AVX2_ONLY)

    def no_build(*args: object) -> None:
        raise AssertionError("built a variant the CPU cannot run")

    monkeypatch.setattr(cpu_kernels, "compile_library", no_build)
    assert "lacks avx512bw avx512f avx512vl" in cpu_kernels.problem("avx512")
    packed = cpu_kernels.pack_weight(torch.zeros(16, 8))
    with pytest.raises(RuntimeError, match="lacks avx512"):
        cpu_kernels.linear(torch.zeros(1, 8), packed, None, "avx512")
    with pytest.raises(ValueError, match="unknown CPU kernel variant"):
        cpu_kernels.problem("avx1024")


def test_pack_weight_needs_whole_panels() -> None:
    with pytest.raises(ValueError, match="cannot pack"):
        cpu_kernels.pack_weight(torch.zeros(20, 8))


def tiny_llama(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("name", [None, *cpu_kernels.VARIANTS])
def test_packed_model_computes_the_same_logits(name) -> None:
    if name is not None:
        runnable(name)
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 12))
    with torch.inference_mode():
        stock = model(ids).logits
        fuse_projections(model)
        assert pack_model(model, name) > 0
        packed = model(ids).logits
        assert model.model.embed_tokens.weight is model.lm_head.weight  # the tie survives
        restore_forwards(model)
        restored = model(ids).logits
    assert (packed - stock).abs().max() < 1e-4
    assert torch.equal(restored, stock)


def kernels_of(runner: ModelRunner) -> tuple[str, bool]:
    """(decode attention, packed CPU matmul) of a runner's kernels."""
    return runner.kernels.decode, runner.kernels.cpu_matmul


def runner(limits: dict) -> ModelRunner:
    return ModelRunner(tiny_llama(), 16, torch.float32, EngineSettings(**limits), 64)


def test_without_measuring_the_engine_keeps_pytorchs_paths_on_cpu() -> None:
    assert kernels_of(runner({"autotune": "off"})) == ("sdpa", False)


def test_explicit_kernels_run_without_measuring() -> None:
    limits = {"autotune": "off", "decode_kernel": "cpu", "cpu_matmul": True}
    assert kernels_of(runner(limits)) == ("cpu", True)


def test_without_a_compiler_auto_falls_back_and_explicit_fails(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(cpu_kernels, "_state", {})
    monkeypatch.setattr(cpu_kernels, "_compiler", lambda: None)
    assert "no C++ compiler" in cpu_kernels.problem()
    with caplog.at_level(logging.WARNING, logger="hearth.engine"):
        assert kernels_of(runner({})) == ("sdpa", False)
    assert "CPU kernels are not used" in caplog.text
    with pytest.raises(ValueError, match="decode_kernel: the CPU kernels cannot run"):
        runner({"decode_kernel": "cpu"})
    with pytest.raises(ValueError, match="cpu_matmul: the CPU kernels cannot run"):
        runner({"decode_kernel": "sdpa", "cpu_matmul": True})


def test_other_dtypes_keep_the_pytorch_path() -> None:
    model = tiny_llama().to(torch.bfloat16)
    kernels = ModelRunner(model, 16, torch.bfloat16, EngineSettings(), 64).kernels
    assert (kernels.decode, kernels.cpu_matmul) == ("sdpa", False)
