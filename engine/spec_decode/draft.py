"""Draft-model proposer: a smaller model sharing the target's tokenizer proposes k tokens.

The draft runs on hearth's own runner (engine/runner.py: kernels, paged attention) with its own
KV cache and block manager. Each target sequence has a shadow sequence here holding the same
tokens: before proposing, the shadow takes the target's tokens (the accepted drafts keep their
KV; the rest is rolled back), computes what it lacks in one chunk, then decodes k - 1 more
tokens, all sequences of the step batched together. Each draft is drawn from the draft's
distribution q under the request's own sampling parameters (its argmax for greedy requests),
and q goes to the verifier for exact rejection sampling.
"""

from __future__ import annotations

from typing import Any

import torch

from hearth.engine.block_manager import BlockManager
from hearth.engine.runner import ModelRunner
from hearth.engine.sampler import probabilities
from hearth.engine.scheduler import Scheduled
from hearth.engine.sequence import Sequence
from hearth.engine.spec_decode.proposer import Proposal
from hearth.engine.spec_decode.rejection import draw


class DraftProposer:
    """Proposes with a draft model over its own paged KV cache."""

    def __init__(
        self,
        model: Any,
        num_blocks: int,
        dtype: torch.dtype,
        settings: Any,
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        """`vocab_size`: the target's (the draft's q is cut or padded to it)."""
        self.runner = ModelRunner(model, num_blocks, dtype, settings, max_model_len)
        self.blocks = BlockManager(num_blocks, settings.block_size, prefix_caching=False)
        self.vocab_size = vocab_size
        self.shadows: dict[Sequence, Sequence] = {}  # target sequence -> the draft's copy

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        self._drop_finished()
        proposals = {seq: Proposal([]) for seq in seqs}
        probs: dict[Sequence, list[torch.Tensor]] = {seq: [] for seq in seqs}
        left = {}
        for seq, num in zip(seqs, num_tokens, strict=True):
            shadow = self._synced(seq)
            if shadow is not None and self.blocks.can_grow(shadow, shadow.num_uncomputed + num):
                # taken now: the next shadow's check sees what is left after this one's
                self.blocks.grow(shadow, shadow.num_uncomputed + num)
                left[seq] = num
        while left:  # one draft token per active sequence and forward
            order = list(left)
            items = []
            for seq in order:
                shadow = self.shadows[seq]
                self.blocks.grow(shadow, shadow.num_uncomputed)
                items.append(Scheduled(shadow, shadow.num_uncomputed))
            logits, _ = self.runner.execute(items)  # [len(items), V_draft]
            logits = _to_vocab(logits.float(), self.vocab_size)  # [len(items), V]
            for i, (seq, item) in enumerate(zip(order, items, strict=True)):
                item.seq.num_computed_tokens += item.num_tokens
                token, q = self._draw(seq, logits[i : i + 1])
                item.seq.output_ids.append(token)
                proposals[seq].token_ids.append(token)
                if q is not None:
                    probs[seq].append(q)
                left[seq] -= 1
            left = {s: n for s, n in left.items() if n > 0}
        for seq, proposal in proposals.items():
            if probs[seq]:
                proposal.probs = torch.cat(probs[seq])  # [k, V]
        return [proposals[seq] for seq in seqs]

    @staticmethod
    def _draw(seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A draft token under seq's sampling parameters, and q [1, V] (None for greedy)."""
        if seq.params.greedy:
            return int(logits[0].argmax()), None
        q = probabilities(logits, [seq.params])  # [1, V]
        return draw(q[0], seq.state.generator), q

    def _synced(self, seq: Sequence) -> Sequence | None:
        """seq's shadow holding seq's tokens, its KV kept where the tokens still agree."""
        shadow = self.shadows.get(seq)
        if shadow is None:
            shadow = Sequence(seq.request_id, seq.index, list(seq.prompt_ids), seq.params)
            self.shadows[seq] = shadow
        same = 0
        for mine, theirs in zip(shadow.output_ids, seq.output_ids, strict=False):
            if mine != theirs:
                break
            same += 1
        agreed = min(shadow.num_prompt_tokens + same, seq.num_tokens - 1)  # the last: to compute
        shadow.num_computed_tokens = min(shadow.num_computed_tokens, agreed)
        shadow.output_ids = list(seq.output_ids)
        self.blocks.trim(shadow)
        return shadow

    def _drop_finished(self) -> None:
        for seq in [s for s in self.shadows if s.is_finished]:
            self.blocks.release(self.shadows.pop(seq))


def _to_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """logits [n, V_draft] -> [n, vocab]: rows cut, or padded with -inf (never drawn)."""
    if logits.shape[1] >= vocab:
        return logits[:, :vocab]
    pad = logits.new_full((logits.shape[0], vocab - logits.shape[1]), float("-inf"))
    return torch.cat([logits, pad], dim=1)
