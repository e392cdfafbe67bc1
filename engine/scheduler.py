"""Iteration-level scheduling under a token budget and the free KV blocks (torch-free).

Priorities (`SamplingParams.priority`, vLLM's sense: lower is served first; live requests 0,
batch lines higher). With every sequence at one priority the scheduler is plain FCFS, as it
always was. With several:

- waiting sequences are admitted in (aged) priority order, then in arrival order;
- a sequence is *lower* when its priority is worse than the best present (and it has not aged
  up to it). A step that computes a better sequence's prompt runs no lower work: lower running
  sequences are held (skipped, their KV kept) and none is admitted, so a better request's first
  token waits only for the step already running. Other steps run at most `lower_share` lower
  sequences (running ones in turn, longest unscheduled first, then admissions), so the steps a
  live request may have to wait for stay short. A priority present within the last `RECENT_S`
  seconds counts as present (a client's next live request usually comes soon after its last);
  with no better work present for that long, lower work runs freely (it is then the best
  present);
- a better sequence that finds no KV blocks or no sequence slot preempts the worst running one
  (recompute, as for memory preemption), never one of its own priority or better.
- a lower sequence's blocks, when it finishes, are the first free blocks taken again
  (`BlockManager.release(evict_first=True)`): a batch's churn does not evict the live
  requests' cached prefixes before its own.

Starvation is bounded twice: lower sequences get `lower_share` places in every step that
computes no better prompt, and by aging: a sequence's level is its priority less one per
`aging_s` seconds since it was first queued, but never below the best priority present. Once
aged to that level it is no longer lower: it ties the best requests and is ordered like them
(FCFS), so a sequence of priority p waits at most about (p - best) * aging_s seconds behind
better work.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from hearth.engine.block_manager import BlockKey, BlockManager
from hearth.engine.sequence import Sequence, Status

AGING_S = 1.0  # seconds in the engine that improve a sequence's priority level by one
LOWER_SHARE = 2  # lower-priority sequences per step while better ones are present (0: any)
RECENT_S = 2.0  # a priority seen this recently still counts as present (between live requests)


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
    running sequence of the worst priority is preempted: its blocks are freed and it is
    requeued for recompute. Priorities and aging: see the module docstring.
    """

    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        aging_s: float = AGING_S,
        clock: Callable[[], float] = time.monotonic,
        lower_share: int = LOWER_SHARE,
    ):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.aging_s = aging_s
        self.clock = clock
        self.lower_share = lower_share
        self._turns = 0  # sequences scheduled so far (each one's turn: Sequence.last_turn)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # May this waiting sequence start next to the running ones? (LoRA slots: pool.py)
        self.admissible: Callable[[Sequence, list[Sequence]], bool] | None = None
        self._floor: int | None = None  # the best priority present, this step (None: one only)
        self._seen: dict[int, float] = {}  # priority -> when it was last present
        self._now = 0.0

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = Status.WAITING
        if seq.enqueued_at is None:
            seq.enqueued_at = self.clock()
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def waiting_by_priority(self) -> dict[int, int]:
        """Queued sequences per priority (for /metrics)."""
        return dict(Counter(seq.priority for seq in self.waiting))

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
            self.blocks.release(seq, evict_first=self.lower(seq))
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED

    def level(self, seq: Sequence) -> float:
        """The sequence's priority aged by its time in the engine, never below the best
        priority present (see the module docstring); its priority when all share one."""
        if self._floor is None:
            return seq.priority
        since = self._now if seq.enqueued_at is None else seq.enqueued_at
        waited = self._now - since
        return max(self._floor, seq.priority - int(waited / self.aging_s))

    def outranks(self, better: Sequence, worse: Sequence) -> bool:
        """`better` may preempt `worse`: a better priority, and `worse` not aged up to it."""
        return better.priority < worse.priority and self.level(better) < self.level(worse)

    def lower(self, seq: Sequence) -> bool:
        """Below the best priority present and not aged up to it (False with one priority)."""
        if self._floor is None or seq.priority == self._floor:
            return False
        return self.level(seq) > self._floor

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._now = self.clock()
        present = {s.priority for s in self.waiting} | {s.priority for s in self.running}
        # a priority present within RECENT_S still counts: between a client's live requests
        # lower work keeps its share, so the step a live arrival waits for stays short
        self._seen.update(dict.fromkeys(present, self._now))
        self._seen = {p: t for p, t in self._seen.items() if self._now - t <= RECENT_S}
        recent = set(self._seen) if present else set()
        self._floor = min(recent) if len(recent) > 1 else None
        if self._floor is not None:  # admission in aged priority order, then arrival order
            self.waiting = deque(sorted(self.waiting, key=lambda s: (self.level(s), s.arrival)))
        # Running sequences, best priority first; decodes (1 token) before prefill chunks,
        # oldest first. Lower-priority ones go after the better arrivals, within their share.
        order = sorted(self.running, key=lambda s: (s.priority, s.num_uncomputed > 1, s.arrival))
        lows = [s for s in order if self.lower(s)]
        budget = self._run(
            [s for s in order if not self.lower(s)], out, self.max_num_batched_tokens
        )
        budget = self._admit(out, budget, room=0)
        if self._floor is None:
            return out
        if any(i.start < i.seq.num_prompt_tokens for i in out.scheduled):
            return out  # a better prompt's step: lower work is held (KV kept) and not admitted
        room = self.lower_share or None
        if room is not None:  # in turn: those scheduled longest ago first
            lows = sorted(lows, key=lambda s: (s.last_turn, s.arrival))[:room]
            room -= len(lows)
        budget = self._run(lows, out, budget)
        self._admit(out, budget, room)
        return out

    def _run(self, seqs: list[Sequence], out: SchedulerOutput, budget: int) -> int:
        """Schedule running sequences in order within `budget`, preempting the worst running
        sequence while blocks are short; returns the budget left."""
        for seq in seqs:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted while making room for another
                continue
            num = min(seq.num_uncomputed, budget)
            spec = self._lookahead(seq, num, budget)
            while not self.blocks.can_grow(seq, num):
                victim = self._worst_running()
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, num + spec)
            out.scheduled.append(Scheduled(seq, num + spec, spec))
            seq.last_turn = self._turn()
            budget -= num + spec
        return budget

    def _admit(self, out: SchedulerOutput, budget: int, room: int | None) -> int:
        """New arrivals (and preempted sequences, which were put at the front), in order;
        returns the budget left. Lower-priority ones only within `room` (None: any number)."""
        computing: set[BlockKey] = set()  # prompt blocks first computed by this step
        deferred: list[Sequence] = []  # wait for a prefix block this step computes
        size = self.blocks.block_size
        short = bool(out.preempted)  # running sequences lacked blocks
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if self.lower(seq) and (room is not None and room <= 0):
                break  # lower work: within its share (and none in a better prompt's step)
            victim = self._victim_for(seq)
            if short and victim is None:  # memory is short: admit nothing new
                break
            if len(self.running) >= self.max_num_seqs:
                if victim is None:
                    break
                budget = self._make_room(victim, out)
                continue
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
                if victim is None:
                    break
                budget = self._make_room(victim, out)
                continue
            computing.update(keys[len(hits) : (len(hits) * size + num) // size])
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.grow(seq, num)
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append(Scheduled(seq, num))
            seq.last_turn = self._turn()
            if room is not None and self.lower(seq):
                room -= 1
            budget -= num
        self.waiting.extendleft(reversed(deferred))  # first in line next step, in arrival order
        return budget

    def _turn(self) -> int:
        self._turns += 1
        return self._turns

    def _worst_running(self) -> Sequence:
        """The preemption victim: the worst priority, then the last admitted."""
        return max(enumerate(self.running), key=lambda p: (p[1].priority, p[0]))[1]

    def _victim_for(self, seq: Sequence) -> Sequence | None:
        """The running sequence `seq` may preempt to start (None: none it outranks)."""
        if self._floor is None or not self.running:
            return None
        victim = self._worst_running()
        return victim if self.outranks(seq, victim) else None

    def _make_room(self, victim: Sequence, out: SchedulerOutput) -> int:
        """Preempt `victim` for the waiting head (which stays first); the budget left."""
        head = self.waiting.popleft()
        self._preempt(victim, out)
        self.waiting.appendleft(head)
        return self.max_num_batched_tokens - out.num_tokens

    def _lookahead(self, seq: Sequence, num: int, budget: int) -> int:
        """Draft tokens of a decode to verify this step: all of seq.spec_token_ids when they
        fit the token budget and the free blocks (less one per running sequence), else none
        (a plain decode)."""
        spec = len(seq.spec_token_ids)
        if not spec or num != seq.num_uncomputed or num + spec > budget:
            return 0
        # a block kept free for each running sequence: drafts never cost another a preemption
        spare = self.blocks.num_free_blocks - len(self.running)
        return spec if self.blocks.blocks_needed(seq, num + spec) <= spare else 0

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
