"""The Triton paged decode kernel (in Triton's interpreter on CPU: equal to gather + SDPA) and the
choice of decode path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hearth.engine.config import EngineSettings
from hearth.engine.kernels.selection import Kernels, choose_kernels
from tests.fixtures.server import ROOT

pytest.importorskip("triton")

KERNEL_CHECK = """
import torch
from hearth.engine.kernels.triton_attention import paged_decode
torch.manual_seed(0)
N, bs, Hkv, D, H = 12, 16, 3, 64, 9
k, v = torch.randn(N, bs, Hkv, D), torch.randn(N, bs, Hkv, D)
lens = torch.tensor([1, 17, 40, 16])
tables = torch.tensor([[5, 0, 0], [3, 7, 0], [1, 2, 9], [11, 0, 0]])
q = torch.randn(4, H, D)
out = paged_decode(q, k, v, tables, lens, 0.125)
for b in range(4):
    L = int(lens[b])
    slots = [int(tables[b, p // bs]) * bs + p % bs for p in range(L)]
    kk, vv = k.flatten(0, 1)[slots], v.flatten(0, 1)[slots]  # [L, Hkv, D]
    for h in range(H):
        weights = torch.softmax((q[b, h] @ kk[:, h // 3].T) * 0.125, -1)
        err = (out[b, h] - weights @ vv[:, h // 3]).abs().max().item()
        assert err < 1e-4, (b, h, err)
print("kernel ok")
"""

FUSED_CHECK = """
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from hearth.engine.kernels.fused_ops import patch_model, rms_norm, silu_mul
from hearth.engine.kernels.fusion import fuse_projections, restore_forwards
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 1e-3)):
    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(96).to(dtype)
    x = torch.randn(3, 5, 96).to(dtype)
    err = (rms_norm(x, norm.weight, 1e-5).float() - norm(x).float()).abs().max().item()
    assert err <= tol * 10, ("norm", dtype, err)
    gu = torch.randn(7, 2 * 1500).to(dtype)  # two column tiles, the second partial
    want = F.silu(gu[:, :1500]) * gu[:, 1500:]
    err = (silu_mul(gu).float() - want.float()).abs().max().item()
    assert err <= tol * 10, ("silu_mul", dtype, err)
shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
for model in (LlamaForCausalLM(LlamaConfig(**shape)), Qwen2ForCausalLM(Qwen2Config(**shape))):
    ids = torch.randint(0, 300, (2, 9))
    with torch.no_grad():
        want = model.eval()(ids).logits
        fuse_projections(model)
        assert patch_model(model) == 2 * 2 + 1 + 2  # 2 norms and an MLP a layer, the final norm
        got = model(ids).logits
        restore_forwards(model)  # the stock modules again (benchmarks compare against them)
        assert not any("forward" in vars(m) for m in model.modules())
        again = model(ids).logits
    assert (got - want).abs().max().item() < 1e-5, type(model).__name__
    assert (again - want).abs().max().item() < 1e-5, type(model).__name__
print("fused ok")
"""

ENGINE_CHECK = """
import asyncio, json, sys, torch
from transformers import AutoModelForCausalLM
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams
path = sys.argv[1]
limits = {"kv_cache_memory": "16MiB", "decode_kernel": "triton", **json.loads(sys.argv[2])}
config = ModelConfig(id="t", source=path, device="cpu", engine=limits)
engine = build_engine(load_model(config, resolve_source(path)))
graphs, replays = engine.core.runner.graphs, []
if graphs is not None:
    run_graph = graphs.run
    graphs.run = lambda *a: replays.append(len(a[0])) or run_graph(*a)
prompts = [[5, 6, 7, 8, 9], [100, 200, 300] * 7, [42] * 17]  # 3 decodes: bucket 4, one pad
async def run(prompt):
    tokens = []
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    async for out in engine.generate(GenerationRequest(str(len(prompt)), prompt, params)):
        tokens += out.token_ids
    return tokens
async def main():
    return await asyncio.gather(*(run(p) for p in prompts))
got = asyncio.run(main())
engine.shutdown()
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
for prompt, tokens in zip(prompts, got):
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6,
                         do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert tokens == ref, (tokens, ref)
if graphs is not None:
    assert 3 in replays and graphs.sizes == [1, 2, 4, 8], (replays, graphs.sizes)
print("engine ok")
"""


def interpret(script: str, *args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1", "HEARTH_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_kernel_matches_reference_attention() -> None:
    assert "kernel ok" in interpret(KERNEL_CHECK)


def test_fused_norm_and_mlp_match_transformers() -> None:
    assert "fused ok" in interpret(FUSED_CHECK)


@pytest.mark.parametrize(
    "limits",
    [
        '{"cuda_graphs": false}',
        '{"cuda_graphs": true, "max_num_seqs": 8}',
        '{"cuda_graphs": true, "max_num_seqs": 8, "fused_kernels": true}',
    ],
    ids=["eager", "graph-buffers", "graph-buffers-fused"],
)
def test_engine_with_the_kernel_equals_generate(tiny_llama_dir: Path, limits: str) -> None:
    """With cuda_graphs the padded static-buffer path runs (eagerly: no CUDA here)."""
    assert "engine ok" in interpret(ENGINE_CHECK, str(tiny_llama_dir), limits)


CPU, GPU, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


@pytest.mark.parametrize(
    ("limits", "devices", "head_dim", "tp", "want"),
    [
        # Without measuring (autotune off, TP): PyTorch's own paths on CPU (kernels/autotune.py)
        ({}, {CPU}, 64, 1, ("sdpa", False, False, False)),
        ({}, {CPU}, 64, 2, ("sdpa", False, False, False)),
        ({"decode_kernel": "cpu", "cpu_matmul": True}, {CPU}, 64, 1, ("cpu", False, False, True)),
        ({"decode_kernel": "sdpa"}, {CPU}, 64, 1, ("sdpa", False, False, False)),
        ({}, {GPU}, 128, 1, ("triton", True, True)),  # auto on one GPU: all the kernels
        ({}, {GPU}, 96, 1, ("sdpa", False, False)),  # a head size the kernel cannot tile
        ({}, {GPU}, 8, 1, ("sdpa", False, False)),  # tl.dot needs 16
        ({"block_size": 8}, {GPU}, 128, 1, ("sdpa", False, False)),
        ({}, {GPU, GPU1}, 128, 1, ("sdpa", False, False)),  # device_map over GPUs: SDPA
        ({}, {GPU}, 128, 2, ("triton", False, False)),  # tensor parallel: no graphs, no fusion
        ({"cuda_graphs": False}, {GPU}, 128, 1, ("triton", False, True)),
        ({"fused_kernels": False}, {GPU}, 128, 1, ("triton", True, False)),
        ({"decode_kernel": "sdpa"}, {GPU}, 128, 1, ("sdpa", False, False)),
        ({"decode_kernel": "triton"}, {GPU, GPU1}, 128, 1, ("triton", False, False)),
    ],
)
def test_kernel_defaults(limits, devices, head_dim, tp, want) -> None:
    assert choose_kernels(EngineSettings(**limits), devices, head_dim, tp) == Kernels(*want)


@pytest.mark.parametrize(
    ("limits", "devices", "head_dim", "tp", "message"),
    [
        ({"decode_kernel": "triton"}, {GPU}, 96, 1, "power-of-two head size"),
        ({"cuda_graphs": True}, {GPU}, 96, 1, "cuda_graphs needs the triton decode kernel"),
        ({"decode_kernel": "triton"}, {CPU}, 64, 1, "needs CUDA"),
        ({"fused_kernels": True}, {CPU}, 64, 1, "fused_kernels needs CUDA"),
        ({"fused_kernels": True}, {GPU}, 128, 2, "tensor_parallel_size 1"),
        ({"decode_kernel": "cpu"}, {GPU}, 128, 1, "needs the model on the CPU"),
        ({"cpu_matmul": True}, {GPU}, 128, 1, "cpu_matmul needs the model on the CPU"),
    ],
)
def test_kernel_choice_rejects_what_cannot_run(limits, devices, head_dim, tp, message) -> None:
    with pytest.raises(ValueError, match=message):
        choose_kernels(EngineSettings(**limits), devices, head_dim, tp)


def test_triton_interpreter_runs_explicit_kernels_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """How the interpreter tests above run the CUDA paths on CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    limits = EngineSettings(decode_kernel="triton", cuda_graphs=True, fused_kernels=True)
    assert choose_kernels(limits, {CPU}, 64) == Kernels("triton", True, True)


def test_graphs_with_sdpa_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="cuda_graphs needs decode_kernel"):
        EngineSettings(decode_kernel="sdpa", cuda_graphs=True)
