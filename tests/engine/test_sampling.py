"""Batched sampling: greedy, filters, and per-request seeds independent of the batch."""

from __future__ import annotations

import torch

from hearth.engine.sampler import logprobs_of, sample
from hearth.engine.types import SamplingParams


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 100)
    params = [SamplingParams(temperature=0)] * 4
    assert torch.equal(sample(logits, params, [None] * 4), logits.argmax(-1))


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    logits = torch.randn(3, 50)
    params = [
        SamplingParams(temperature=1, top_k=1),
        SamplingParams(temperature=1, top_p=1e-6),
        SamplingParams(temperature=1, min_p=1.0),
    ]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    assert torch.equal(sample(logits, params, gens), logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 1000)
    seeded = SamplingParams(temperature=1.0, seed=7)

    def draw(rows: list[int]) -> list[int]:
        params = [seeded if r == 2 else SamplingParams(temperature=1.0) for r in rows]
        gens = [torch.Generator().manual_seed(7) if r == 2 else None for r in rows]
        out = sample(logits[rows], params, gens)
        return out[rows.index(2)].item()

    assert draw([2]) == draw([0, 1, 2, 3, 4]) == draw([4, 2])


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    params = [SamplingParams(temperature=1.0)] * 4000
    gen = torch.Generator().manual_seed(1)
    draws = sample(logits, params, [gen] * 4000)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_top_k_restricts_choices() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(500, 1)
    params = [SamplingParams(temperature=2.0, top_k=2)] * 500
    draws = sample(logits, params, [torch.Generator().manual_seed(0)] * 500)
    assert set(draws.tolist()) == {0, 1}


def test_logit_bias_can_force_a_token() -> None:
    logits = torch.zeros(2, 10)
    params = [SamplingParams(temperature=0, logit_bias={7: 100.0}), SamplingParams(temperature=0)]
    assert sample(logits, params, [None, None]).tolist()[0] == 7


def test_logprobs() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    chosen, values, ids = logprobs_of(logits, torch.tensor([1]), 2)
    expected = torch.log_softmax(logits, -1)
    assert torch.isclose(chosen[0], expected[0, 1])
    assert ids.tolist() == [[0, 1]] and torch.allclose(values[0], expected[0, :2])


def test_penalties() -> None:
    from hearth.engine.sampler import apply_penalties

    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)]
    out = apply_penalties(logits, params, prompt_ids=[[3]], output_ids=[[0, 0, 1]])
    # token 0: generated twice -> 2 - 0.25*2 - 0.5 = 1.0, then repetition /2 -> 0.5
    # token 1: generated once -> -1 - 0.25 - 0.5 = -1.75, then repetition *2 -> -3.5
    # token 2: unseen -> unchanged; token 3: in the prompt only -> 1.0 / 2
    assert torch.allclose(out, torch.tensor([[0.5, -3.5, 0.5, 0.5]]))
    assert apply_penalties(logits, [SamplingParams()], [[3]], [[0]]) is logits
