"""Item 8 and part of item 6 of issue 28, on a tiny random Llama: each output reports the prompt
tokens the prefix cache served (usage's cached_tokens), and logit_bias keys beyond the
vocabulary are refused by the engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.types import GenerationRequest, InvalidRequestError, SamplingParams
from tests.engine.test_engine import start_engine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    engine = start_engine(tiny_llama_dir)
    yield engine
    engine.shutdown()


async def cached(engine: AsyncEngine, rid: str, prompt: list[int]) -> list[int]:
    request = GenerationRequest(rid, prompt, SamplingParams(max_tokens=3, temperature=0))
    return [out.num_cached_tokens async for out in engine.generate(request)]


def test_a_repeated_prompt_reports_its_cached_tokens(engine: AsyncEngine) -> None:
    block = engine.core.blocks.block_size
    prompt = [(7 * i) % 40000 + 3 for i in range(3 * block + 5)]
    first = asyncio.run(cached(engine, "c1", prompt))
    again = asyncio.run(cached(engine, "c2", prompt))
    assert set(first) == {0}  # nothing was cached yet
    assert len(set(again)) == 1  # every output of the sample says the same
    assert again[0] > 0 and again[0] % block == 0 and again[0] < len(prompt)
    other = asyncio.run(cached(engine, "c3", [5, *prompt]))  # another first token: no prefix
    assert set(other) == {0}


@pytest.mark.parametrize("token", [-1, 10**9])
def test_logit_bias_beyond_the_vocabulary_is_refused(engine: AsyncEngine, token: int) -> None:
    async def run() -> None:
        sampling = SamplingParams(max_tokens=2, logit_bias={token: 5.0})
        async for _ in engine.generate(GenerationRequest(f"b{token}", [5, 6, 7], sampling)):
            pass

    with pytest.raises(InvalidRequestError) as caught:
        asyncio.run(run())
    assert caught.value.param == "logit_bias"
