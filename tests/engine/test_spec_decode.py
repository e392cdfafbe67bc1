"""Speculative decoding in the engine: greedy tokens identical with and without it (n-gram and
draft models, tiny random pairs and SmolLM2 drafting for itself), and it keeps working with
stop strings, max_tokens, logprobs, seeds, preemption, prefix caching and opt-out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.spec_decode.build import load_draft
from hearth.engine.types import GenerationRequest, SamplingParams
from tests.fixtures.server import DEFAULT_GGUF, build_tiny_checkpoint

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "max_batch": 8}


def start(source: str, speculative: dict | None = None, **engine) -> AsyncEngine:
    config = ModelConfig(
        id="m",
        source=source,
        device="cpu",
        engine={"kv_cache_memory": "64MiB", "autotune": "off", **engine},
        speculative=speculative,
    )
    return build_engine(load_model(config, resolve_source(source)), load_draft(config))


def corpus(n: int = 8) -> list[list[int]]:
    """Prompts that repeat themselves (the n-gram proposer finds matches) and random ones."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        part = torch.randint(3, 49152, (6 + i,), generator=gen).tolist()
        out.append(part * 3 if i % 2 == 0 else part + part[:3])
    return out


async def _one(engine: AsyncEngine, rid: str, prompt: list[int], params: SamplingParams):
    tokens, text, logprobs, finish, outputs, samples = [], "", [], None, 0, {}
    async for out in engine.generate(GenerationRequest(rid, prompt, params)):
        assert out.error is None, out.error
        tokens += out.token_ids
        samples.setdefault(out.index, []).extend(out.token_ids)
        text += out.text
        logprobs += out.logprobs or []
        finish = out.finish_reason or finish
        outputs += 1
    return {
        "tokens": tokens,
        "samples": samples,
        "text": text,
        "logprobs": logprobs,
        "finish": finish,
        "n": outputs,
    }


def run_all(engine: AsyncEngine, prompts: list[list[int]], **params) -> list[dict]:
    async def main() -> list[dict]:
        return await asyncio.gather(
            *(_one(engine, f"r{i}", p, SamplingParams(**params)) for i, p in enumerate(prompts))
        )

    return asyncio.run(main())


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-draft"), smollm_tokenizer_dir, seed=1
    )


@pytest.fixture(scope="module")
def plain(tiny_llama_dir: Path):
    engine = start(str(tiny_llama_dir))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def ngram(tiny_llama_dir: Path):
    engine = start(str(tiny_llama_dir), NGRAM)
    yield engine
    engine.shutdown()


def test_greedy_identical_with_ngram_speculation(plain: AsyncEngine, ngram: AsyncEngine) -> None:
    prompts = corpus()
    want = run_all(plain, prompts, max_tokens=40, temperature=0, ignore_eos=True)
    got = run_all(ngram, prompts, max_tokens=40, temperature=0, ignore_eos=True)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    assert all(len(g["tokens"]) == 40 for g in got)  # max_tokens exactly, never more
    stats = ngram.core.stats()
    assert stats.spec_accepted_tokens > 0 and stats.spec_proposed_tokens > 0
    assert sum(g["n"] for g in got) < sum(w["n"] for w in want)  # several tokens per output
    assert ngram.core.blocks.num_used_blocks == 0  # every lookahead block given back


@pytest.mark.parametrize("seed", [1, 0])  # another random model, and the target itself
def test_greedy_identical_with_a_draft_model(
    plain: AsyncEngine, tiny_llama_dir: Path, smollm_tokenizer_dir: Path, tmp_path: Path, seed: int
) -> None:
    draft = str(build_tiny_checkpoint(tmp_path / "draft", smollm_tokenizer_dir, seed=seed))
    spec = {"method": "draft", "draft": draft, "num_speculative_tokens": 3, "max_batch": 8}
    engine = start(str(tiny_llama_dir), spec)
    try:
        prompts = corpus(6)
        want = run_all(plain, prompts, max_tokens=24, temperature=0, ignore_eos=True)
        got = run_all(engine, prompts, max_tokens=24, temperature=0, ignore_eos=True)
        assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
        stats = engine.core.stats()
        assert stats.spec_proposed_tokens > 0
        if seed == 0:  # the draft is the target: every draft is accepted
            assert stats.spec_accepted_tokens == stats.spec_proposed_tokens
        # sampled: runs, and a seed reproduces
        first = run_all(engine, prompts[:2], max_tokens=16, temperature=1.0, seed=3)
        again = run_all(engine, prompts[:2], max_tokens=16, temperature=1.0, seed=3)
        assert [r["tokens"] for r in first] == [r["tokens"] for r in again]
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "params",
    [
        dict(repetition_penalty=1.3),
        dict(presence_penalty=0.8, frequency_penalty=0.5),
        dict(min_tokens=20, logit_bias={5: 3.0}),
    ],
)
def test_greedy_identical_with_penalties_min_tokens_and_bias(
    plain: AsyncEngine, ngram: AsyncEngine, params: dict
) -> None:
    """Penalties and min_tokens apply at each draft position as if the drafts before it were
    generated: greedy tokens stay the same."""
    prompts = corpus(4)
    want = run_all(plain, prompts, max_tokens=30, temperature=0, **params)
    before = ngram.core.stats().spec_proposed_tokens
    got = run_all(ngram, prompts, max_tokens=30, temperature=0, **params)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
    if "presence_penalty" not in params:  # (that one keeps the tiny model from repeating)
        assert ngram.core.stats().spec_proposed_tokens > before


def test_logprobs_stop_strings_and_max_tokens(plain: AsyncEngine, ngram: AsyncEngine) -> None:
    prompts = corpus(4)
    params = dict(max_tokens=30, temperature=0, ignore_eos=True, logprobs=2)
    want = run_all(plain, prompts, **params)
    got = run_all(ngram, prompts, **params)
    for g, w in zip(got, want, strict=True):
        assert g["tokens"] == w["tokens"]
        assert [lp.token_id for lp in g["logprobs"]] == g["tokens"]
        assert len(g["logprobs"]) == len(w["logprobs"]) == 30
        for a, b in zip(g["logprobs"], w["logprobs"], strict=True):  # the target's logprobs
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
    # a stop string inside a multi-token step ends the text where plain decoding ends it
    text = want[0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    if stop.strip():
        stopped = run_all(plain, prompts[:1], max_tokens=30, temperature=0, stop=[stop])[0]
        spec = run_all(ngram, prompts[:1], max_tokens=30, temperature=0, stop=[stop])[0]
        assert spec["text"] == stopped["text"] and spec["finish"] == stopped["finish"] == "stop"


def test_seeded_sampling_is_reproducible_and_opt_out_speculates_nothing(
    ngram: AsyncEngine,
) -> None:
    prompts = corpus(3)
    first = run_all(ngram, prompts, max_tokens=20, temperature=0.8, seed=11)
    again = run_all(ngram, prompts, max_tokens=20, temperature=0.8, seed=11)
    assert [r["tokens"] for r in first] == [r["tokens"] for r in again]
    before = ngram.core.stats().spec_proposed_tokens
    run_all(ngram, prompts, max_tokens=20, temperature=0, speculative=False)
    assert ngram.core.stats().spec_proposed_tokens == before


def test_several_samples_and_sampled_logprobs(plain: AsyncEngine, ngram: AsyncEngine) -> None:
    """n > 1 samples speculate each on their own; sampled rows report the target's logprobs."""
    prompts = corpus(2)
    params = dict(max_tokens=24, temperature=0, ignore_eos=True, n=2)
    want = run_all(plain, prompts, **params)
    got = run_all(ngram, prompts, **params)
    assert [g["samples"] for g in got] == [w["samples"] for w in want]
    assert all(len(g["samples"]) == 2 for g in got)
    sampled = run_all(ngram, prompts, max_tokens=24, temperature=0.7, logprobs=1, seed=2)
    for r in sampled:
        assert [lp.token_id for lp in r["logprobs"]] == r["tokens"] and len(r["tokens"]) <= 24
        assert all(lp.logprob <= 0 and len(lp.top) == 1 for lp in r["logprobs"])


def test_preemption_and_prefix_cache_keep_greedy_tokens(tiny_llama_dir: Path) -> None:
    """A cache too small for every request at once (preemption), prompts sharing a prefix."""
    prompts = [corpus(2)[0] + [100 + i] for i in range(8)]
    small = {"kv_cache_memory": "160KiB", "block_size": 16}
    plain, spec = start(str(tiny_llama_dir), **small), start(str(tiny_llama_dir), NGRAM, **small)
    try:
        want = run_all(plain, prompts, max_tokens=80, temperature=0, ignore_eos=True)
        got = run_all(spec, prompts, max_tokens=80, temperature=0, ignore_eos=True)
        assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
        stats = spec.core.stats()
        assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
        assert stats.spec_accepted_tokens > 0
        assert spec.core.blocks.num_used_blocks == 0
    finally:
        plain.shutdown()
        spec.shutdown()


def test_smollm2_drafting_for_itself_keeps_greedy_tokens() -> None:
    spec = {"method": "draft", "draft": DEFAULT_GGUF, "num_speculative_tokens": 4, "max_batch": 4}
    engine, plain = start(DEFAULT_GGUF, spec), start(DEFAULT_GGUF)
    try:
        texts = ["Write a haiku about the sea.", "def add(a, b):\n    return a + b\n\nRepeat:"]
        prompts = [plain.encode(t) for t in texts]
        want = run_all(plain, prompts, max_tokens=24, temperature=0)
        got = run_all(engine, prompts, max_tokens=24, temperature=0)
        assert [g["tokens"] for g in got] == [w["tokens"] for w in want]
        stats = engine.core.stats()
        assert stats.spec_accepted_tokens > 0.8 * stats.spec_proposed_tokens > 0
    finally:
        engine.shutdown()
        plain.shutdown()


def test_the_switch_is_measured_once_and_cached(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hearth.engine.spec_decode import switch

    monkeypatch.setenv("HEARTH_CACHE_DIR", str(tmp_path))
    spec = {"method": "ngram", "num_speculative_tokens": 4}  # max_batch: measured
    engine = start(str(tiny_llama_dir), spec, autotune="auto", max_num_seqs=4)
    try:
        measured = engine.core.spec.max_batch, engine.core.spec.costs
        assert measured[0] in (0, 1, 2, 4) and all(c > 0 for c in measured[1].values())
        assert 1 in measured[1]  # batch 1 is always timed
        [cached] = (tmp_path / "spec_decode").glob("*.json")
        calls = []
        monkeypatch.setattr(switch, "measure", lambda *a: calls.append(a) or (0, {}))
        runner, settings = engine.core.runner, engine.core.settings
        assert switch.max_batch(runner, 4, settings) == measured and not calls
        assert cached.exists()
    finally:
        engine.shutdown()


def test_a_verification_that_keeps_fewer_tokens_than_it_cost_is_a_miss() -> None:
    """With the measured cost of a verification step (switch.py) at the running batch size, a
    verification that kept fewer tokens than that cost sends the sequence into the back-off
    (it sits out the next step); one that paid does not."""
    from hearth.engine.sequence import Sequence, Status
    from hearth.engine.spec_decode.proposer import Proposal
    from hearth.engine.spec_decode.speculator import Speculator

    class Nothing:
        def propose(self, seqs, nums):
            return [Proposal([]) for _ in seqs]

    spec = Speculator(Nothing(), num_tokens=4, max_batch=4)
    spec.costs = {1: 2.5, 2: 3.0, 4: 4.0}
    params = SamplingParams(max_tokens=64, temperature=0)
    seqs = [Sequence(f"r{i}", 0, [1, 2, 3], params) for i in range(2)]
    for seq in seqs:
        seq.status, seq.num_computed_tokens = Status.RUNNING, 2  # one token to compute
    spec.propose(seqs[:1], lambda s: 64)  # one running: the batch-1 cost, 2.5 decode steps
    spec._record(seqs[0], 1)  # 2 tokens kept < 2.5: a miss
    spec._record(seqs[1], 2)  # 3 tokens kept: paid
    assert spec._sits_out(seqs[0]) and not spec._sits_out(seqs[1])
