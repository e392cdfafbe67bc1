"""Prompt logprobs (vLLM's prompt_logprobs, completions echo scoring) against transformers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.types import (
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from tests.engine.test_engine import prompts, reference_model, start_engine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    engine = start_engine(tiny_llama_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def chunked(tiny_llama_dir: Path):
    """Prefill chunks of 16 tokens at most: a longer prompt is scored over several steps."""
    engine = start_engine(tiny_llama_dir, max_num_batched_tokens=16)
    yield engine
    engine.shutdown()


def expected(engine: AsyncEngine, prompt: list[int]) -> torch.Tensor:
    """transformers' log_softmax over the vocabulary at each prompt position: [P, V] float32."""
    model = reference_model(engine.info.source)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return logits.log_softmax(dim=-1)


def run(engine: AsyncEngine, rid: str, prompt: list[int], **params) -> list[GenerationOutput]:
    async def main() -> list[GenerationOutput]:
        request = GenerationRequest(rid, prompt, SamplingParams(**params))
        return [out async for out in engine.generate(request)]

    return asyncio.run(main())


def scores_of(outputs: list[GenerationOutput], index: int = 0) -> list:
    found = [o.prompt_logprobs for o in outputs if o.index == index and o.prompt_logprobs]
    assert len(found) == 1, "prompt logprobs come once, with the sample's first output"
    return found[0]


def check_against_transformers(engine: AsyncEngine, prompt: list[int], scores: list, k: int):
    logp = expected(engine, prompt)
    assert len(scores) == len(prompt) and scores[0] is None
    for pos in range(1, len(prompt)):
        entry, row = scores[pos], logp[pos - 1]
        assert entry.token_id == prompt[pos]
        assert entry.logprob == pytest.approx(row[prompt[pos]].item(), abs=1e-4)
        assert entry.rank == int((row > row[prompt[pos]]).sum()) + 1
        want_values, want_ids = row.topk(k)
        assert [t for t, _ in entry.top] == want_ids.tolist()
        assert [v for _, v in entry.top] == pytest.approx(want_values.tolist(), abs=1e-4)


def test_prompt_logprobs_match_transformers_over_chunks(chunked: AsyncEngine) -> None:
    prompt = prompts(4)[-1] * 3  # 42 tokens: three prefill chunks of at most 16
    outputs = run(chunked, "pl1", prompt, temperature=0, max_tokens=2, prompt_logprobs=3)
    check_against_transformers(chunked, prompt, scores_of(outputs), 3)
    assert sum(len(o.token_ids) for o in outputs) == 2


def test_prompt_logprobs_with_k_zero_carry_no_alternatives(engine: AsyncEngine) -> None:
    prompt = prompts(2)[-1]
    scores = scores_of(run(engine, "pl0", prompt, temperature=0, max_tokens=1, prompt_logprobs=0))
    check_against_transformers(engine, prompt, scores, 0)
    assert all(entry.top == [] for entry in scores[1:])


def test_max_tokens_zero_scores_the_prompt_only(chunked: AsyncEngine) -> None:
    prompt = prompts(3)[-1] * 2  # 22 tokens
    outputs = run(chunked, "pl-score", prompt, max_tokens=0, prompt_logprobs=1)
    assert [o.token_ids for o in outputs] == [[]]
    [last] = outputs
    assert last.finish_reason == "length" and last.num_completion_tokens == 0
    assert last.num_prompt_tokens == len(prompt)
    check_against_transformers(chunked, prompt, scores_of(outputs), 1)
    stats = chunked.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_max_tokens_zero_ends_every_sample(engine: AsyncEngine) -> None:
    prompt = prompts(6)[-1]
    outputs = run(engine, "pl-n0", prompt, n=2, max_tokens=0, prompt_logprobs=0)
    assert sorted(o.index for o in outputs) == [0, 1]
    assert all(o.finish_reason == "length" and not o.token_ids for o in outputs)
    for index in (0, 1):
        check_against_transformers(engine, prompt, scores_of(outputs, index), 0)
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_used) == (0, 0, 0)


def test_a_cached_prefix_is_scored_again(engine: AsyncEngine) -> None:
    prompt = prompts(9)[-1] * 2  # 58 tokens: 3 full blocks of 16 the second request could reuse
    first = scores_of(run(engine, "pc1", prompt, temperature=0, max_tokens=1, prompt_logprobs=2))
    hits = engine.stats().prefix_cache_hits
    second = scores_of(run(engine, "pc2", prompt, temperature=0, max_tokens=1, prompt_logprobs=2))
    assert engine.stats().prefix_cache_hits == hits  # recomputed, not taken from the cache
    assert [(e.token_id, e.top) for e in second[1:]] == [(e.token_id, e.top) for e in first[1:]]
    assert [e.logprob for e in second[1:]] == pytest.approx([e.logprob for e in first[1:]])
    check_against_transformers(engine, prompt, second, 2)


def test_every_sample_gets_the_prompt_logprobs(engine: AsyncEngine) -> None:
    prompt = prompts(5)[-1]
    outputs = run(
        engine, "pn", prompt, temperature=1.0, seed=1, n=2, max_tokens=2, prompt_logprobs=1
    )
    for index in (0, 1):
        check_against_transformers(engine, prompt, scores_of(outputs, index), 1)


def test_prompt_logprobs_survive_preemption(tiny_llama_dir: Path) -> None:
    small = start_engine(tiny_llama_dir, kv_cache_memory="64KiB")  # 8 blocks of 16 tokens

    async def main() -> list[list[GenerationOutput]]:
        async def one(i: int, prompt: list[int]) -> list[GenerationOutput]:
            params = SamplingParams(
                temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1
            )
            request = GenerationRequest(f"pp{i}", prompt, params)
            return [out async for out in small.generate(request)]

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))

    try:
        batch = prompts(6)
        results = asyncio.run(main())
        assert small.stats().num_preemptions > 0
        for prompt, outputs in zip(batch, results, strict=True):
            check_against_transformers(small, prompt, scores_of(outputs), 1)
    finally:
        small.shutdown()


def test_requests_without_prompt_logprobs_get_none(engine: AsyncEngine) -> None:
    outputs = run(engine, "plnone", prompts(1)[0], temperature=0, max_tokens=2)
    assert all(o.prompt_logprobs is None for o in outputs)


@pytest.mark.parametrize("value", [-1, 21])
def test_out_of_range_prompt_logprobs_name_the_field(value: int) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(prompt_logprobs=value)
    assert caught.value.param == "prompt_logprobs"


def test_negative_max_tokens_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        SamplingParams(max_tokens=-1)
    assert caught.value.param == "max_tokens"
