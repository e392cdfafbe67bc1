"""Rejection sampling preserves the target's distribution (chi-square on a tiny vocabulary),
and a deliberately biased verifier fails the same test."""

from __future__ import annotations

import torch

from hearth.engine.spec_decode.rejection import draw, greedy_verify, rejection_sample

VOCAB = 6
SAMPLES = 6000
# chi-square critical value, 5 degrees of freedom, p = 0.001: a correct sampler fails 1 in 1000
CRITICAL = 20.52
P = torch.tensor(
    [[0.05, 0.30, 0.10, 0.25, 0.20, 0.10], [0.40, 0.05, 0.05, 0.20, 0.20, 0.10]]
)  # [k + 1 = 2, V] the target's distributions at the draft position and after it
Q = torch.tensor([[0.30, 0.05, 0.35, 0.10, 0.10, 0.10]])  # [k = 1, V] the draft's


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def first_tokens(verify, draft_probs: torch.Tensor | None, fixed: int | None = None):
    """Counts of the first token emitted over SAMPLES seeded runs: drafts drawn from q (or a
    fixed draft: a deterministic proposal), then verified."""
    counts = torch.zeros(VOCAB)
    for seed in range(SAMPLES):
        gen = torch.Generator().manual_seed(seed)
        token = fixed if fixed is not None else draw(draft_probs[0], gen)
        out = verify(P, [token], draft_probs, gen)
        counts[out[0]] += 1
    return counts


def biased(target, draft_ids, draft_probs, generator):
    """A wrong verifier: keeps the draft with probability p(x) but redraws from the full p on
    rejection (the draft token gets extra mass)."""
    u = float(torch.rand(1, generator=generator))
    if u < float(target[0, draft_ids[0]]):
        return [draft_ids[0]]
    return [draw(target[0], generator)]


def test_rejection_sampling_with_a_draft_distribution_is_the_targets() -> None:
    counts = first_tokens(rejection_sample, Q)
    assert chi_square(counts, P[0]) < CRITICAL, counts


def test_deterministic_proposal_is_the_targets_for_every_draft_token() -> None:
    for token in range(VOCAB):
        counts = first_tokens(rejection_sample, None, fixed=token)
        assert chi_square(counts, P[0]) < CRITICAL, (token, counts)


def test_a_biased_verifier_fails_the_test() -> None:
    counts = first_tokens(biased, None, fixed=1)
    assert chi_square(counts, P[0]) > CRITICAL, counts
    # accepting every draft gives q's distribution, not p's
    always = first_tokens(lambda t, d, q, g: [d[0]], Q)
    assert chi_square(always, P[0]) > CRITICAL


def test_second_token_after_an_accepted_draft_is_drawn_from_the_next_distribution() -> None:
    """Given the draft was kept, the bonus token follows p_1 (fixed draft 1, p_0(1) = 0.3)."""
    counts = torch.zeros(VOCAB)
    for seed in range(SAMPLES):
        out = rejection_sample(P, [1], None, torch.Generator().manual_seed(seed))
        if len(out) == 2:
            counts[out[1]] += 1
    assert abs(counts.sum() / SAMPLES - 0.30) < 0.03
    assert chi_square(counts, P[1]) < CRITICAL, counts


def test_seeded_rejection_is_reproducible() -> None:
    runs = [
        [rejection_sample(P, [3], Q, torch.Generator().manual_seed(7)) for _ in range(2)]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_greedy_verify_keeps_the_matching_prefix_then_the_targets_token() -> None:
    assert greedy_verify([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]
    assert greedy_verify([5, 9, 7, 8], [5, 6, 7]) == [5, 9]
    assert greedy_verify([4, 6], [5]) == [4]
