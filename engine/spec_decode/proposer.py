"""The proposer interface of speculative decoding: draft tokens for running sequences.

A proposer sees the sequences that may speculate this step (decodes, after the engine's
per-request checks) and how many tokens each may take; it returns one `Proposal` per sequence
(possibly empty). The engine verifies them all in the target's next forward.

Kinds: `ngram.py` (prompt lookup, no model) and `draft.py` (a smaller model sharing the
tokenizer, its own paged KV cache). EAGLE-3 / MTP heads fit the same interface but need what
it does not yet give them (docs/speculative_decoding.md): the target's hidden states of the
verified positions, and a proposer that runs on the target's device without its own tokenizer
checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from hearth.engine.sequence import Sequence

if TYPE_CHECKING:  # torch-free at import: the n-gram proposer's tests run without torch
    import torch


@dataclass
class Proposal:
    """Draft tokens for one sequence, and how they were drawn."""

    token_ids: list[int]
    # [len(token_ids), V] the draft distribution q each token was drawn from; None: chosen
    # deterministically (rejection sampling then treats q as one-hot at the token)
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    """Drafts for a step. A proposer that keeps state per sequence (a draft model's KV blocks)
    drops that of finished sequences itself (`Sequence.is_finished`)."""

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        """One Proposal per sequence, at most num_tokens[i] tokens for seqs[i]; the sequences'
        tokens are `seq.token_ids()` (prompt and output so far)."""
        ...
