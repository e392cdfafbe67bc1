"""Exact rejection sampling for speculative decoding (Leviathan et al. 2023, Chen et al. 2023).

Draft token x_i, proposed with probability q_i(x_i), is kept with probability
min(1, p_i(x_i) / q_i(x_i)), p_i being the target's distribution at its position; at the first
rejection a token is drawn from the residual norm(max(p_i - q_i, 0)) and the rest is dropped;
when every draft is kept, one more token comes from p_k. The tokens returned are distributed
exactly as the target's own samples. A deterministic proposal (n-gram: q one-hot at x) keeps x
with probability p(x) and on rejection draws from p with x removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def greedy_verify(target_ids: Sequence[int], draft_ids: Sequence[int]) -> list[int]:
    """Greedy requests: the drafts that equal the target's argmax, then the target's own next
    token. target_ids: the argmax at each of the k + 1 positions; returns 1..k+1 tokens."""
    out = []
    for target, draft in zip(target_ids, draft_ids, strict=False):
        out.append(target)
        if target != draft:
            return out
    return [*out, target_ids[len(draft_ids)]]


def rejection_sample(
    target: torch.Tensor,  # [k + 1, V] the target's probabilities at each draft position and after
    draft_ids: Sequence[int],  # [k]
    draft_probs: torch.Tensor | None,  # [k, V] the proposer's q; None: deterministic (one-hot)
    generator: torch.Generator | None = None,
) -> list[int]:
    """The accepted drafts plus one token (1..k+1 tokens), distributed as the target's own
    samples. A seeded request passes its generator: k uniforms, then one exponential race."""
    k, device = len(draft_ids), target.device
    ids = torch.tensor(list(draft_ids), dtype=torch.long, device=device)  # [k]
    p_x = target[:k].gather(1, ids[:, None]).squeeze(1)  # [k]
    q_x = (
        torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(1, ids[:, None])[:, 0]
    )  # [k]
    u = torch.rand(k, generator=generator, device=device)  # [k]
    kept = (u * q_x < p_x).long()  # u < p / q without dividing (q > 0 where x was drawn)
    n = int(kept.cumprod(0).sum())  # drafts kept before the first rejection
    if n == k:
        residual = target[k]  # [V]
    elif draft_probs is None:
        residual = target[n].clone()
        residual[draft_ids[n]] = 0.0  # max(p - onehot(x), 0) up to the normaliser
    else:
        residual = (target[n] - draft_probs[n]).clamp_min(0.0)
    # float rounding can leave no mass (p == q): then p itself, which is the same distribution
    residual = residual + (residual.sum() <= 0).float() * target[n]
    return [*draft_ids[:n], draw(residual, generator)]


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from unnormalised weights [V] (an exponential race: argmax w / E)."""
    noise = torch.empty_like(weights).exponential_(generator=generator)  # [V]
    return int((weights / noise).argmax())
