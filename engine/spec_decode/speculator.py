"""The engine's side of speculative decoding: who speculates this step, and verification.

Per step, `propose` asks the proposer for draft tokens for the running decodes that may
speculate (the per-request rules of `applies`, the batch-size switch `max_batch`), and puts them
on `Sequence.spec_token_ids`; the scheduler gives each its lookahead slots and the runner scores
every draft position in the target's one forward. `verify` turns those logits into the tokens
each sequence keeps: greedy rows keep the drafts equal to the target's argmax, sampled rows go
through exact rejection sampling (rejection.py), so the output is distributed as without
speculation. The core appends them and rolls back the rejected drafts' KV
(`Scheduler.accept_drafts`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hearth.engine.sampler import Sampler, SamplingRow, apply_bias, logprobs_of, probabilities
from hearth.engine.scheduler import Scheduled
from hearth.engine.sequence import Sequence
from hearth.engine.spec_decode.proposer import Proposal, Proposer
from hearth.engine.spec_decode.rejection import greedy_verify, rejection_sample
from hearth.engine.types import TokenLogprob

log = logging.getLogger("hearth.engine")

MAX_SIT_OUT = 32  # decode steps a sequence whose drafts keep failing waits at most


@dataclass
class Verified:
    """What one speculating sequence keeps from a step: accepted drafts plus one token."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # the target's, where the request asked for them

    @property
    def num_accepted(self) -> int:
        return len(self.token_ids) - 1


def applies(seq: Sequence) -> bool:
    """Whether a request may speculate. Falls back to plain decoding for grammars (a later
    position's mask depends on the matcher's state after the drafts), LoRA adapters and image
    prompts, and where the request opted out. Penalties and min_tokens are applied per draft
    position, as if the drafts before it were generated (`verify`)."""
    p = seq.params
    return p.speculative and p.grammar is None and p.lora is None and seq.mm is None


class Speculator:
    """Proposes draft tokens for a step's decodes and verifies them against the target."""

    def __init__(self, proposer: Proposer, num_tokens: int, max_batch: int | None = None) -> None:
        self.proposer = proposer
        self.num_tokens = num_tokens  # k: draft tokens per sequence and step at most
        # running sequences at most for a step to speculate (None: measured at start, switch.py)
        self.max_batch = max_batch
        # {batch size: a verification step's cost in decode steps} (switch.py; {}: unknown)
        self.costs: dict[int, float] = {}
        self._cost = 1.0  # this step's: a verification keeping fewer tokens is a miss
        self.num_proposed = 0  # draft tokens verified
        self.num_accepted = 0  # of those, kept
        self._drafted: dict[Sequence, Proposal] = {}
        self._misses: dict[Sequence, list[int]] = {}  # seq -> [steps to sit out, misses in a row]

    def propose(self, running: list[Sequence], budget_left: Callable[[Sequence], int]) -> None:
        """Put draft tokens on the running decodes that may speculate this step.
        budget_left(seq): tokens seq may still generate (the drafts plus one more fit)."""
        self.clear()
        if not running or len(running) > (self.max_batch or 0):
            return
        above = [b for b in self.costs if b >= len(running)]
        self._cost = self.costs[min(above)] if above else 1.0
        self._misses = {s: m for s, m in self._misses.items() if not s.is_finished}
        seqs, nums = [], []
        for seq in running:
            if seq.num_uncomputed != 1 or not applies(seq) or self._sits_out(seq):
                continue
            num = min(self.num_tokens, budget_left(seq) - 1)
            if num > 0:
                seqs.append(seq)
                nums.append(num)
        if not seqs:
            return
        try:
            proposals = self.proposer.propose(seqs, nums)
        except Exception:  # a proposer's failure (the draft model's) costs the drafts only
            log.exception("speculative decoding: proposing failed; this step decodes plainly")
            return
        for seq, proposal in zip(seqs, proposals, strict=True):
            if proposal.token_ids:
                seq.spec_token_ids = proposal.token_ids
                self._drafted[seq] = proposal

    def _sits_out(self, seq: Sequence) -> bool:
        """Back-off: after a verification that did not pay (fewer tokens kept than it cost) the
        sequence sits out 1, 2, 4 ... (at most MAX_SIT_OUT) steps, so a text with nothing to
        look up costs few verifications."""
        miss = self._misses.get(seq)
        if miss is None or miss[0] == 0:
            return False
        miss[0] -= 1
        return True

    def _record(self, seq: Sequence, accepted: int) -> None:
        """A verification that kept fewer tokens (accepted + 1) than it cost is a miss."""
        if accepted + 1 >= self._cost:
            self._misses.pop(seq, None)
            return
        miss = self._misses.setdefault(seq, [0, 0])
        miss[1] += 1
        miss[0] = min(MAX_SIT_OUT, 2 ** (miss[1] - 1))

    def clear(self) -> None:
        """Take the last step's drafts off their sequences."""
        for seq in self._drafted:
            seq.spec_token_ids = []
        self._drafted.clear()

    def verify(
        self, sampler: Sampler, logits: torch.Tensor, items: list[tuple[Scheduled, int]]
    ) -> list[Verified]:
        """logits [R, V] of the step's sampled rows; items: (scheduled item with drafts, its
        first row), its 1 + num_spec rows scoring the last token and each draft. The sampler's
        penalties and min_tokens apply to row i as if drafts[:i] were already generated."""
        results = []
        for item, row in items:
            seq, k = item.seq, item.num_spec
            drafts = seq.spec_token_ids[:k]
            proposal = self._drafted.get(seq)
            q = None if proposal is None or proposal.probs is None else proposal.probs[:k]
            positions = [
                SamplingRow(seq.params, seq.prompt_ids, [*seq.output_ids, *drafts[:i]])
                for i in range(k + 1)
            ]
            rows = sampler.processed(logits[row : row + k + 1].float(), positions)  # [k + 1, V]
            params = [seq.params] * (k + 1)
            if seq.params.greedy:
                tokens = greedy_verify(apply_bias(rows, params).argmax(-1).tolist(), drafts)
            else:
                target = probabilities(rows, params)  # [k + 1, V]
                tokens = rejection_sample(target, drafts, q, seq.state.generator)
            self.num_proposed += k
            self.num_accepted += len(tokens) - 1
            self._record(seq, len(tokens) - 1)
            results.append(Verified(tokens, _logprobs(rows, tokens, seq.params.logprobs)))
        return results


def _logprobs(rows: torch.Tensor, tokens: list[int], k: int | None) -> list[TokenLogprob] | None:
    """The target's logprobs of the kept tokens (rows [>= len(tokens), V]) and top k."""
    if k is None:
        return None
    ids = torch.tensor(tokens, device=rows.device)
    chosen, values, top = logprobs_of(rows[: len(tokens)], ids, k)
    return [
        TokenLogprob(t, c, list(zip(i, v, strict=True)))
        for t, c, v, i in zip(tokens, chosen.tolist(), values.tolist(), top.tolist(), strict=True)
    ]
