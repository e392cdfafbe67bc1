"""The bounds printed beside the GPU figures (bench/gpu_bounds.py): FLOPs of a request, the
compute bound of N x 1024/128, the batch-1 bandwidth bound. Torch-free (the measuring itself,
matmul_rate, runs in tests/contracts/test_bench.py's small GPU bench on CPU)."""

from __future__ import annotations

import pytest

from bench.gpu_bounds import (
    bandwidth_bound_tok_s,
    compute_bound_tok_s,
    decoder_linear_params,
    request_flops,
)

EIGHT_B = dict(  # bench/engine_bench.py's llama-3.1-8b (which imports torch)
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
)


def test_an_8b_request_of_1024_in_128_out() -> None:
    # Llama-3.1-8B: 8.03B parameters, of which 2 x 0.525B are the embedding and the lm_head.
    assert decoder_linear_params(EIGHT_B) == 6_979_321_856
    parts = request_flops(EIGHT_B, 1024, 128)
    assert parts["linear"] == 2 * 6_979_321_856 * 1152
    assert parts["lm_head"] == 2 * 128256 * 4096 * 129  # the last prompt token and each output
    assert parts["attention"] == 4 * 32 * 32 * 128 * (1152 * 1151 / 2 + 1152)
    assert sum(parts.values()) == pytest.approx(16.56e12, rel=1e-3)
    # 790 TFLOP/s (the bf16 rate measured on these cards): ~6.1k output tok/s at most
    bf16 = compute_bound_tok_s(EIGHT_B, 1024, 128, 790e12)
    assert bf16 == pytest.approx(128 * 790e12 / sum(parts.values()))
    assert 6000 < bf16 < 6200
    # fp8 projections at twice the rate: the bound rises, by less than 2x (lm_head, attention)
    fp8 = compute_bound_tok_s(EIGHT_B, 1024, 128, 790e12, linear_rate=1580e12)
    assert 1.9 * bf16 < fp8 < 2 * bf16


def test_the_bandwidth_bound() -> None:
    # 16.06 GB of weights and 1 MB of KV at 4.3 TB/s: ~268 tok/s
    assert bandwidth_bound_tok_s(4.3e12, 16_060_000_000, 1_000_000) == pytest.approx(267.7, 0.01)
