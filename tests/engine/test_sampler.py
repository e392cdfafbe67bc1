"""The Sampler on its own: every logits-processing step on small hand-made logits."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from hearth.engine.constrained.grammar import GrammarCompiler
from hearth.engine.sampler import Sampler, SamplingRow, sample
from hearth.engine.types import SamplingParams

EOS = 3


def row(prompt: list[int] | None = None, output: list[int] | None = None, **params) -> SamplingRow:
    seed = params.get("seed")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(SamplingParams(**params), prompt or [0], output or [], generator)


def draw(logits: list[float], rows: list[SamplingRow], sampler: Sampler | None = None):
    sampler = sampler or Sampler([EOS], None)
    return sampler(torch.tensor([logits] * len(rows)), rows)


def test_temperature_0_is_the_argmax_of_each_row() -> None:
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5], [3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 9.0]])
    rows = [row(temperature=0), row(temperature=0), row(temperature=0, ignore_eos=True)]
    out = Sampler([EOS], None)(logits, rows)
    assert out.token_ids == [1, 0, 3]
    assert out.logprobs == [None, None, None]


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached() -> None:
    logits = [0.0, 1.0, 4.0, 5.0]  # EOS (3) most likely, then stop token 2
    early = row(output=[1], temperature=0, min_tokens=2, stop_token_ids=[2])
    reached = row(output=[1, 1], temperature=0, min_tokens=2, stop_token_ids=[2])
    assert draw(logits, [early, reached]).token_ids == [1, EOS]
    # The suppressed tokens have no probability in the reported logprobs either.
    out = draw(
        logits, [row(output=[1], temperature=0, min_tokens=2, stop_token_ids=[2], logprobs=4)]
    )
    assert out.logprobs[0][0].top[0][0] == 1
    assert out.logprobs[0][0].top[-1][1] == -math.inf


def test_penalties_change_the_choice_and_the_logprobs() -> None:
    logits = [1.0, 0.9, 0.0, -5.0]
    plain = draw(logits, [row(output=[0], temperature=0, logprobs=0)])
    assert plain.token_ids == [0]
    penalised = draw(logits, [row(output=[0], temperature=0, presence_penalty=0.5, logprobs=0)])
    assert penalised.token_ids == [1]
    expected = torch.tensor([0.5, 0.9, 0.0, -5.0]).log_softmax(-1)[1].item()
    assert penalised.logprobs[0][0].logprob == pytest.approx(expected)
    # Repetition reaches prompt tokens too: 1.0 / 2 falls below 0.9.
    repeated = draw(logits, [row(prompt=[0], temperature=0, repetition_penalty=2.0)])
    assert repeated.token_ids == [1]


def test_logit_bias_moves_the_draw_but_not_the_reported_logprobs() -> None:
    logits = [2.0, 1.0, 0.0, -5.0]
    out = draw(logits, [row(temperature=0, logit_bias={2: 10.0}, logprobs=1), row(temperature=0)])
    assert out.token_ids == [2, 0]
    unbiased = torch.tensor(logits).log_softmax(-1)
    assert out.logprobs[0][0].logprob == pytest.approx(unbiased[2].item())
    assert out.logprobs[0][0].top == [(0, pytest.approx(unbiased[0].item()))]
    negative = draw(logits, [row(temperature=0, logit_bias={0: -100.0})])
    assert negative.token_ids == [1]


@pytest.mark.parametrize(
    ("filters", "allowed"),
    [
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.7), {0, 1}),  # the mass before token 2 is 0.9: dropped
        (dict(top_p=0.6), {0}),  # the mass before token 1 is 0.6: dropped too
        (dict(min_p=0.25), {0, 1}),  # floor 0.6 * 0.25 = 0.15 drops p = 0.1
        (dict(), {0, 1, 2}),
    ],
)
def test_top_k_top_p_min_p_mask_the_draws(filters: dict, allowed: set[int]) -> None:
    logits = torch.tensor([0.6, 0.3, 0.1, 0.0]).log().tolist()  # token 3: probability 0
    rows = [row(temperature=1.0, seed=i, **filters) for i in range(400)]
    assert set(draw(logits, rows).token_ids) == allowed


def test_temperature_flattens_the_distribution() -> None:
    logits = torch.tensor([0.9, 0.1, 1e-9, 1e-9]).log().tolist()
    cold = draw(logits, [row(temperature=0.2, seed=i) for i in range(300)]).token_ids
    hot = draw(logits, [row(temperature=5.0, seed=i) for i in range(300)]).token_ids
    assert cold.count(1) < 10 < 60 < hot.count(1)


def test_the_same_seed_gives_the_same_draw_whatever_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 1000)

    def seeded(seed: int) -> SamplingRow:
        return row(temperature=1.0, seed=seed)

    alone = Sampler([EOS], None)(logits, [seeded(7)]).token_ids[0]
    batch = [row(temperature=1.0), seeded(7), row(temperature=0), seeded(8)]
    mixed = Sampler([EOS], None)(logits.repeat(4, 1), batch).token_ids
    assert mixed[1] == alone
    others = {Sampler([EOS], None)(logits, [seeded(s)]).token_ids[0] for s in range(20)}
    assert len(others) > 1  # the seed matters


def test_logprobs_and_top_alternatives_per_row() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 3)
    rows = [row(temperature=0, logprobs=2), row(temperature=0), row(temperature=0, logprobs=0)]
    out = Sampler([EOS], None)(logits, rows)
    expected = logits[0].log_softmax(-1).tolist()
    first = out.logprobs[0][0]
    assert first.token_id == 0 and first.logprob == pytest.approx(expected[0])
    assert [t for t, _ in first.top] == [0, 1]
    assert [lp for _, lp in first.top] == pytest.approx(expected[:2])
    assert out.logprobs[1] is None
    assert out.logprobs[2][0].top == [] and out.logprobs[2][0].logprob == pytest.approx(expected[0])
    assert all(isinstance(t, int) for t, _ in first.top) and isinstance(out.token_ids[0], int)


def test_one_device_to_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(1) or tolist(t))
    logits = torch.randn(3, 50)
    rows = [row(temperature=0, logprobs=3), row(temperature=1.0, seed=1), row(top_p=0.5)]
    Sampler([EOS], None)(logits, rows)
    assert len(copies) == 1


class FakeMatcher:
    """Allows a fixed set of tokens, writing llguidance's bitmask (bit set: allowed)."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def unsafe_compute_mask_ptr(self, address: int, size: int) -> None:
        words = (ctypes.c_uint32 * (size // 4)).from_address(address)
        for i in range(len(words)):
            words[i] = 0
        for token in self.allowed:
            words[token // 32] |= 1 << (token % 32)


class RecordingCloser:
    def __init__(self) -> None:
        self.budgets: list = []

    def sample(self, logits, budgets, params, generators) -> torch.Tensor:
        self.budgets.append(budgets)
        return sample(logits, params, generators)


class FakeGrammars:
    """GrammarCompiler's own mask over fake matchers, and a closer that records its budgets."""

    mask = GrammarCompiler.mask

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.closer = RecordingCloser()


def test_the_grammar_mask_constrains_draws_and_logprobs() -> None:
    vocab = 40  # two mask words
    logits = torch.arange(vocab, dtype=torch.float32).repeat(2, 1)  # the last token most likely
    grammars = FakeGrammars(vocab)
    closing = object()
    constrained = SamplingRow(
        SamplingParams(temperature=0, logprobs=1),
        [0],
        [],
        matcher=FakeMatcher({5, 33}),
        closing=closing,
        budget=9,
    )
    free = SamplingRow(SamplingParams(temperature=0, logprobs=1), [0], [])
    out = Sampler([EOS], grammars)(logits, [free, constrained])
    assert out.token_ids == [39, 33]
    masked = torch.full((vocab,), -math.inf)
    masked[[5, 33]] = torch.tensor([5.0, 33.0])
    assert out.logprobs[1][0].logprob == pytest.approx(masked.log_softmax(-1)[33].item())
    assert out.logprobs[0][0].logprob == pytest.approx(logits[0].log_softmax(-1)[39].item())
    assert grammars.closer.budgets == [[(1, closing, 9)]]  # only constrained rows are steered
    seeded = [
        SamplingRow(
            SamplingParams(temperature=2.0),
            [0],
            [],
            torch.Generator().manual_seed(i),
            FakeMatcher({5, 33}),
        )
        for i in range(100)
    ]
    flat = torch.zeros(100, vocab)
    flat[:, 39] = 10.0  # masked out: 5 and 33 are left, equally likely
    assert set(Sampler([EOS], grammars)(flat, seeded).token_ids) == {5, 33}


def test_without_a_grammar_nothing_is_steered() -> None:
    grammars = FakeGrammars(8)
    Sampler([EOS], grammars)(torch.zeros(2, 8), [row(temperature=0), row(temperature=0)])
    assert grammars.closer.budgets == []
