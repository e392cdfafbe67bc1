"""Memory held once per layout used: float32 originals dropped where the packed CPU matmul
serves every row count, rebuilt exactly when forwards are restored; the CPU KV cache's zeros
as lazily committed pages."""

from __future__ import annotations

import os

import pytest
import torch

from bench.soak import rss_kb
from hearth.engine.kernels import cpu_kernels, cpu_linear
from hearth.engine.kernels.cpu_linear import pack_model
from hearth.engine.kernels.fusion import fuse_projections, restore_forwards
from hearth.engine.kv_cache import KVCache, KVCacheSpec
from tests.engine.test_cpu_kernels import tiny_llama

pytestmark = pytest.mark.skipif(
    not cpu_kernels.variants() or cpu_kernels.problem() is not None,
    reason="no CPU kernel build on this host",
)


def linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@pytest.mark.parametrize("tied", [True, False])
def test_final_packing_drops_the_originals_and_restoring_rebuilds_them(
    tied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_linear, "kernel_keeps_up", lambda *args: True)
    model = tiny_llama(tied)
    ids = torch.randint(0, 256, (1, 300))  # above MAX_ROWS: the prefill path
    with torch.inference_mode():
        stock = model(ids).logits
        weights = linear_weights(model)
        fuse_projections(model)
        assert pack_model(model, final=True) > 0
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.stride() == (0, 0)  # a one-element stand-in, no memory
        assert model.model.layers[1].mlp.down_proj.weight.stride() == (0, 0)
        # a tied lm_head keeps its weight: the embedding lookup reads it
        assert (model.lm_head.weight.stride() == (0, 0)) is not tied
        packed = model(ids).logits
        x = torch.randn(3, 64)
        alone = attn.k_proj(x)  # a sibling called on its own: the group's matmul, sliced
        restore_forwards(model)
        assert all(torch.equal(w, linear_weights(model)[n]) for n, w in weights.items())
        assert torch.allclose(alone, attn.k_proj(x), atol=1e-5)
        restored = model(ids).logits
    assert (packed - stock).abs().max() < 1e-4
    assert torch.equal(restored, stock)
    if tied:
        assert model.model.embed_tokens.weight is model.lm_head.weight


@pytest.mark.parametrize("final, keeps_up", [(False, True), (True, False)])
def test_originals_stay_for_trials_and_where_the_kernel_is_slower(
    final: bool, keeps_up: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cpu_linear, "kernel_keeps_up", lambda *args: keeps_up)
    model = tiny_llama(tied=False)
    with torch.inference_mode():
        fuse_projections(model)
        pack_model(model, final=final)
    assert model.model.layers[0].self_attn.q_proj.weight.stride() == (64, 1)
    assert model.lm_head.weight.stride() == (64, 1)


def test_kernel_keeps_up_times_both_paths() -> None:
    weight = torch.randn(128, 64)
    assert isinstance(
        cpu_linear.kernel_keeps_up(weight, cpu_kernels.pack_weight(weight), None), bool
    )


def rss_kib() -> int:
    return rss_kb(os.getpid())


def test_cpu_kv_cache_pages_are_committed_when_used_and_handed_back() -> None:
    spec = KVCacheSpec(num_layers=4, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    before = rss_kib()
    cache = KVCache(spec, num_blocks=4095, block_size=16, devices=[torch.device("cpu")] * 4)
    # 4 layers x K and V x 4096 blocks x 16 x 4 x 64 floats = 512 MiB, none of it touched yet
    assert rss_kib() - before < 64 * 1024
    assert all(t.abs().max() == 0 for t in (*cache.k_cache, *cache.v_cache))
    cache.fill(seed=0, blocks=4096)
    assert rss_kib() - before > 400 * 1024
    cache.fill(seed=None)  # zeros again, by handing the pages back
    assert rss_kib() - before < 64 * 1024
    assert all(t.abs().max() == 0 for t in (*cache.k_cache, *cache.v_cache))
