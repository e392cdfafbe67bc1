"""quantization gguf: block kernels, repacking, the loader path and the engine on a tiny GGUF."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from hearth.engine.config import ModelConfig
from hearth.engine.kernels import gguf_kernels
from hearth.engine.kernels.gguf_kernels import BlockWeight
from hearth.engine.loading.loader import LoadError, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.quantization import gguf_weights
from tests.fixtures.gguf import write_tiny_gguf

VARIANTS = gguf_kernels.variants()
needs_kernels = pytest.mark.skipif(not VARIANTS, reason="no GGUF kernel variant runs here")


def random_blocks(kind: str, n: int, k: int, seed: int = 0) -> BlockWeight:
    """Random GGUF rows of this kind, quantized by gguf-py, repacked."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n, k)).astype(np.float32) * 0.1
    qtype = GGMLQuantizationType.Q4_1 if kind == "q4_1" else GGMLQuantizationType.Q8_0
    return gguf_weights.repack(quants.quantize(weights, qtype), kind, k)


@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_repacked_blocks_dequantize_like_gguf_py(kind: str) -> None:
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(1)
    weights = rng.standard_normal((7, 96)).astype(np.float32)
    qtype = GGMLQuantizationType.Q4_1 if kind == "q4_1" else GGMLQuantizationType.Q8_0
    raw = quants.quantize(weights, qtype)
    ours = gguf_weights.dequantize(gguf_weights.repack(raw, kind, 96))
    assert torch.equal(ours, torch.from_numpy(quants.dequantize(raw, qtype)))


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (3, 7, 96), (5, 37, 160), (17, 19, 576)])
def test_kernel_matches_the_float64_reference(variant: str, kind: str, m: int, n: int, k: int):
    weight = random_blocks(kind, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(n)
    reference = x.double() @ gguf_weights.dequantize(weight).double().T + bias.double()
    out = gguf_kernels.linear(x, weight, bias, variant=variant)
    assert out.shape == (m, n) and out.dtype == torch.float32
    scale = x.double().abs() @ gguf_weights.dequantize(weight).double().abs().T
    assert ((out.double() - reference).abs() <= 1e-6 * scale + 1e-6).all()


@needs_kernels
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["q4_1", "q8_0"])
def test_a_rows_result_does_not_depend_on_the_batch(variant: str, kind: str) -> None:
    weight = random_blocks(kind, 45, 224)
    x = torch.randn(13, 224, generator=torch.Generator().manual_seed(3))
    batch = gguf_kernels.linear(x, weight, variant=variant)
    for i in range(13):
        assert torch.equal(gguf_kernels.linear(x[i : i + 1], weight, variant=variant)[0], batch[i])
    assert torch.equal(gguf_kernels.linear(x[5:11], weight, variant=variant), batch[5:11])
    torch.set_num_threads(1)
    try:
        assert torch.equal(gguf_kernels.linear(x, weight, variant=variant), batch)
    finally:
        torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))


def test_unknown_variant_and_mismatched_input_are_errors() -> None:
    assert gguf_kernels.problem("sse9") is not None
    weight = random_blocks("q8_0", 4, 64)
    with pytest.raises((ValueError, RuntimeError)):
        gguf_kernels.linear(torch.randn(2, 32), weight)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", smollm_tokenizer_dir)


def load(path: Path, **fields: object):
    config = ModelConfig(id="tiny", source=str(path), device="cpu", **fields)
    return load_model(config, resolve_source(config.source))


@needs_kernels
def test_auto_keeps_the_gguf_blocks_and_they_are_the_float32_weights(tiny_gguf: Path) -> None:
    loaded = load(tiny_gguf)
    assert loaded.quantization == "gguf"
    linears = [m for m in loaded.model.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 2 * 7 + 1  # q k v o gate up down per layer, and the tied lm_head
    for module in linears:  # q/k rows un-permuted like transformers' conversion, bit for bit
        assert torch.equal(gguf_weights.dequantize(module._hearth_blocks), module.weight)
    assert loaded.model.lm_head._hearth_blocks.kind == "q8_0"


def test_none_and_the_refusals(tiny_gguf: Path, tiny_llama_dir: Path) -> None:
    loaded = load(tiny_gguf, quantization="none")
    assert loaded.quantization == "none"
    assert not any(hasattr(m, "_hearth_blocks") for m in loaded.model.modules())
    assert load(tiny_llama_dir).quantization == "none"  # auto, not a GGUF source
    with pytest.raises(LoadError, match=r"quantization gguf: needs a \.gguf source"):
        load(tiny_llama_dir, quantization="gguf")
    with pytest.raises(LoadError, match="quantization gguf: computes in float32"):
        load(tiny_gguf, quantization="gguf", dtype="bfloat16")
    with pytest.raises(LoadError, match="quantization gguf: not under tensor parallelism"):
        load(tiny_gguf, quantization="gguf", tensor_parallel_size=2)
    assert "CPU only" in gguf_weights.refusal("gguf", "gguf", "cuda", torch.float32)
    assert gguf_weights.refusal("auto", "gguf", "cuda", torch.float32) is None


def test_a_block_type_without_kernels(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_weights, "KINDS", {8: "q8_0"})  # as if Q4_1 had no kernel
    assert load(tiny_gguf).quantization == "none"
    with pytest.raises(LoadError, match="Q4_1"):
        load(tiny_gguf, quantization="gguf")


@needs_kernels
def test_greedy_outputs_with_gguf_equal_those_with_none(
    tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hearth.engine.builder import build_engine
    from hearth.engine.quantization.gguf_linear import MAX_ROWS
    from hearth.engine.types import GenerationRequest, SamplingParams

    calls = []
    bind = gguf_kernels.bind

    def counted(*args, **kwargs):
        kernel = bind(*args, **kwargs)
        return lambda x: calls.append(1) or kernel(x)

    monkeypatch.setattr(gguf_kernels, "bind", counted)
    gen = torch.Generator().manual_seed(5)
    count = MAX_ROWS + 2  # decode steps above the row limit, then (as requests end) within it
    prompts = [torch.randint(3, 49152, (4 + 5 * i,), generator=gen).tolist() for i in range(count)]
    params = [
        SamplingParams(max_tokens=6 + 4 * i, temperature=0, ignore_eos=True) for i in range(count)
    ]
    results = {}
    for quantization in ("gguf", "none"):  # the kernels fixed: autotune may prefer either here
        engine = build_engine(
            load(tiny_gguf, quantization=quantization, engine={"autotune": "off"})
        )
        routed = (
            engine.core.runner.model.lm_head.forward.__module__
            == "hearth.engine.quantization.gguf_linear"
        )
        assert routed == (quantization == "gguf")

        async def one(i: int, prompt: list[int], engine=engine) -> list[int]:
            ids: list[int] = []
            request = GenerationRequest(f"g{i}", prompt, params[i])
            async for out in engine.generate(request):
                ids += out.token_ids
            return ids

        async def main(engine=engine) -> list[list[int]]:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

        try:
            results[quantization] = asyncio.run(main())
        finally:
            engine.shutdown()
    assert results["gguf"] == results["none"]
    assert calls  # the block kernel did run


@needs_kernels
def test_a_second_load_reads_the_block_cache(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    from hearth.engine.quantization import gguf_block_cache

    first = load(tiny_gguf)  # writes the cache unless an earlier test did
    assert gguf_block_cache.cache_path(tiny_gguf).is_file()

    def no_reading(*_: object) -> None:
        raise AssertionError("read the GGUF file again")

    monkeypatch.setattr(gguf_weights, "_read_blocks", no_reading)
    second = load(tiny_gguf)
    assert second.quantization == "gguf"
    layer = second.model.model.layers[1].self_attn
    assert layer.q_proj._hearth_group_blocks.n == sum(
        getattr(layer, p).out_features for p in ("q_proj", "k_proj", "v_proj")
    )
    for a, b in zip(first.model.modules(), second.model.modules(), strict=True):
        if hasattr(a, "_hearth_blocks"):
            assert torch.equal(a._hearth_blocks.qs, b._hearth_blocks.qs)
            assert torch.equal(gguf_weights.dequantize(b._hearth_blocks), b.weight)


def test_no_kernels_here(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_kernels, "problem", lambda variant=None: "this CPU lacks avx2")
    assert load(tiny_gguf).quantization == "none"
    with pytest.raises(LoadError, match="lacks avx2"):
        load(tiny_gguf, quantization="gguf")
