"""The Triton paged decode kernel, run by Triton's interpreter on CPU: equal to gather + SDPA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytest.importorskip("triton")

KERNEL_CHECK = """
import torch
from engine.triton_attention import paged_decode
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

ENGINE_CHECK = """
import asyncio, json, sys, torch
from transformers import AutoModelForCausalLM
from engine.async_engine import build_engine
from engine.config import ModelConfig
from engine.loader import load_model
from engine.sources import resolve_source
from engine.types import GenerationRequest, SamplingParams
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


@pytest.mark.parametrize(
    "limits", ["{}", '{"cuda_graphs": true, "max_num_seqs": 8}'], ids=["eager", "graph-buffers"]
)
def test_engine_with_the_kernel_equals_generate(tiny_llama_dir: Path, limits: str) -> None:
    """With cuda_graphs the padded static-buffer path runs (eagerly: no CUDA here)."""
    assert "engine ok" in interpret(ENGINE_CHECK, str(tiny_llama_dir), limits)
