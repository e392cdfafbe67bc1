"""Tensor parallelism on CPU: `torchrun -m hearth serve` over two gloo processes equals one."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import torch

from tests.fixtures.server import running_server

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def test_two_ranks_serve_the_same_greedy_tokens_as_transformers(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    config = tmp_path / "tp.yaml"
    config.write_text(
        "models:\n"
        f"  - id: tiny-tp\n    source: {tiny_llama_dir}\n    device: cpu\n"
        "    tensor_parallel_size: 2\n    engine: {kv_cache_memory: 32MiB, max_num_seqs: 8}\n"
    )
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300, 400, 500, 600, 700]]
    env = {"HEARTH_NUM_THREADS": "1"}
    with running_server("--config", str(config), env=env, launcher=TORCHRUN) as (base, proc):
        replies = [
            httpx.post(
                f"{base}/completions",
                json={
                    "model": "tiny-tp",
                    "prompt": prompt,
                    "max_tokens": 8,
                    "temperature": 0,
                    "logprobs": 0,
                },
                timeout=60,
            ).json()
            for prompt in prompts
        ]
    assert proc.wait(timeout=60) is not None  # SIGTERM reached both ranks
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for prompt, reply in zip(prompts, replies, strict=True):
        out = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
        expected = [
            torch.log_softmax(score[0].float(), -1)[token].item()
            for score, token in zip(out.scores, out.sequences[0, len(prompt) :], strict=True)
        ]
        got = reply["choices"][0]["logprobs"]["token_logprobs"]
        assert reply["usage"]["completion_tokens"] == 8
        assert got == pytest.approx(expected, abs=1e-4), (got, expected)
        assert all(math.isfinite(v) for v in got)


def test_tensor_parallel_needs_torchrun(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import LoadError, load_model
    from hearth.engine.loading.sources import resolve_source

    config = ModelConfig(id="tp", source=str(tiny_llama_dir), device="cpu", tensor_parallel_size=2)
    with pytest.raises(LoadError, match="torchrun --nproc-per-node 2"):
        load_model(config, resolve_source(config.source))
