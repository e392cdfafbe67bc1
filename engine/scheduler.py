"""Iteration-level scheduling under a token budget and the free KV blocks (torch-free)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hearth.engine.block_manager import BlockKey, BlockManager
from hearth.engine.sequence import Sequence, Status


@dataclass
class Scheduled:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, from `start` on (lookahead included)
    num_spec: int = 0  # of those, the last are draft tokens (seq.spec_token_ids) to verify
    start: int = field(init=False)  # seq.num_computed_tokens when scheduled
    reaches_end: bool = field(init=False)  # the chunk reaches the sequence's end: sample a token

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.reaches_end = self.start + self.num_tokens - self.num_spec == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[Scheduled] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    """Each step: running sequences first (decodes, then unfinished prefill chunks), then new
    arrivals while the token budget and free blocks allow. When blocks run out, the newest
    running sequence is preempted: its blocks are freed and it is requeued for recompute.
    """

    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # May this waiting sequence start next to the running ones? (LoRA slots: pool.py)
        self.admissible: Callable[[Sequence, list[Sequence]], bool] | None = None

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        # Running sequences, oldest first; decodes (1 token) before long prefill chunks.
        for seq in sorted(self.running, key=lambda s: (s.num_uncomputed > 1, s.arrival)):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted while making room for another
                continue
            num = min(seq.num_uncomputed, budget)
            spec = self._lookahead(seq, num, budget)
            while not self.blocks.can_grow(seq, num):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, num + spec)
            out.scheduled.append(Scheduled(seq, num + spec, spec))
            budget -= num + spec
        # New arrivals (and preempted sequences, which were put at the front), in order.
        computing: set[BlockKey] = set()  # prompt blocks first computed by this step
        deferred: list[Sequence] = []  # wait for a prefix block this step computes
        size = self.blocks.block_size
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            if out.preempted:  # memory is short: admit nothing new this step
                break
            seq = self.waiting[0]
            if self.admissible is not None and not self.admissible(seq, self.running):
                deferred.append(self.waiting.popleft())  # its adapter needs a slot: later
                continue
            keys = self.blocks.prefix_keys(seq)
            # Prompt logprobs need every prompt position's logits: no prefix from the cache.
            scores = seq.params.prompt_logprobs is not None
            hits = [] if scores else self.blocks.cached_prefix(seq, keys)
            if len(keys) > len(hits) and keys[len(hits)] in computing:
                # A sequence admitted this step computes this prefix block (a shared system
                # prompt in a burst of arrivals): start next step and reuse it from the cache;
                # arrivals behind it that need no such block go on being admitted.
                deferred.append(self.waiting.popleft())
                continue
            num = min(seq.num_tokens - len(hits) * size, budget)
            if not self.blocks.can_admit(seq, num, hits):
                break
            computing.update(keys[len(hits) : (len(hits) * size + num) // size])
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.grow(seq, num)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(Scheduled(seq, num))
            budget -= num
        self.waiting.extendleft(reversed(deferred))  # first in line next step, in arrival order
        return out

    def _lookahead(self, seq: Sequence, num: int, budget: int) -> int:
        """Draft tokens of a decode to verify this step: all of seq.spec_token_ids when they
        fit the token budget and the free blocks, else none (a plain decode)."""
        spec = len(seq.spec_token_ids)
        if not spec or num != seq.num_uncomputed or num + spec > budget:
            return 0
        return spec if self.blocks.can_grow(seq, num + spec) else 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.release(seq)
        self.add(seq, front=True)
        out.preempted.append(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]

    def after_step(self, out: SchedulerOutput) -> None:
        """Advance the progress of what ran and key the newly full blocks."""
        for item in out.scheduled:  # draft tokens count once verified (accept_drafts)
            item.seq.num_computed_tokens += item.num_tokens - item.num_spec
            self.blocks.register_computed(item.seq)

    def accept_drafts(self, seq: Sequence, num_accepted: int) -> None:
        """After verification: the first `num_accepted` draft tokens (now in output_ids) keep
        their K/V; the rejected ones' are rolled back (blocks past the computed tokens freed)."""
        if seq.status is not Status.RUNNING:  # finished on one of them
            return
        seq.num_computed_tokens += num_accepted
        self.blocks.register_computed(seq)
        self.blocks.trim(seq)
