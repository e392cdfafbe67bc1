"""What autotune times on one CUDA GPU, without a GPU: the exact candidate list for the 8B and
70B shapes the device check serves (bf16 and fp8 alike: fp8 changes the matmuls, not the
kernels), and the three steps it times at the device check's engine settings."""

from __future__ import annotations

import pytest
import torch

from hearth.engine.config import EngineSettings
from hearth.engine.kernels.autotune import Workload, workloads
from hearth.engine.kernels.selection import Kernels, tuning_candidates
from hearth.engine.kv_cache import KVCacheSpec

pytest.importorskip("triton")  # candidates with the Triton kernels need Triton importable

GPU = torch.device("cuda", 0)
EIGHT_B = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
SEVENTY_B = KVCacheSpec(num_layers=80, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)

# decode kernel, CUDA graphs, fused norm/MLP kernels: every combination `auto` may pick, the
# PyTorch path (SDPA, no graphs, no fusion) first; graphs only with the Triton kernel.
EVERY = [
    Kernels("sdpa", False, False),
    Kernels("triton", False, False),
    Kernels("triton", True, False),
    Kernels("sdpa", False, True),
    Kernels("triton", False, True),
    Kernels("triton", True, True),
]


@pytest.mark.parametrize("spec", [EIGHT_B, SEVENTY_B], ids=["8b", "70b"])
def test_every_combination_on_one_gpu(spec: KVCacheSpec) -> None:
    devices = [GPU] * spec.num_layers  # one device per attention layer
    got = tuning_candidates(EngineSettings(), devices, spec, gguf=False)
    assert got == EVERY
    assert not any(k.cpu_matmul or k.cpu_variant or k.threads or k.gguf for k in got)


@pytest.mark.parametrize(
    ("settings", "want"),
    [
        ({"cuda_graphs": False}, [k for k in EVERY if not k.graphs]),
        ({"fused_kernels": False}, [k for k in EVERY if not k.fused]),
        ({"decode_kernel": "triton"}, [k for k in EVERY if k.decode == "triton"]),
        ({"decode_kernel": "sdpa"}, [k for k in EVERY if k.decode == "sdpa"]),
        ({"decode_kernel": "triton", "cuda_graphs": True, "fused_kernels": True}, [EVERY[-1]]),
    ],
)
def test_explicit_settings_narrow_the_list(settings: dict, want: list[Kernels]) -> None:
    got = tuning_candidates(EngineSettings(**settings), [GPU] * 32, EIGHT_B, gguf=False)
    assert got == want


def test_a_model_over_two_gpus_times_nothing() -> None:
    devices = [GPU] * 16 + [torch.device("cuda", 1)] * 16  # device_map: SDPA only
    assert tuning_candidates(EngineSettings(), devices, EIGHT_B, False) == [EVERY[0]]


def test_the_steps_timed_at_the_device_checks_settings() -> None:
    """bench/gpu_bench.py's engines: 256 sequences (1024/128), 8192 tokens a step, contexts
    of 1168, ~30k KV blocks (a GPU's share): decode x1 and x256 at 128 tokens of context, and
    one prefill chunk of 512."""
    got = workloads(256, 8192, 1168, 30_000, 16)
    assert got == [
        Workload("decode x1", 1, 128),
        Workload("decode x256", 256, 128),
        Workload("prefill 512", 1, 512, prefill=True),
    ]
    # 70B bf16 on an H200: ~13k tokens of KV (820 blocks) still hold every step's blocks
    tight = workloads(64, 4096, 1168, 820, 16)
    rows = tight[1].batch * -(-tight[1].context // 16) + -(-tight[2].context // 16)
    assert rows <= 820 and tight[1].batch == 64
