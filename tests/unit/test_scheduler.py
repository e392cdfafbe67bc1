"""Scheduler and block manager on their own (torch-free): budgets, preemption, prefix reuse."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.engine.block_manager import BlockManager
from hearth.engine.scheduler import RECENT_S, Scheduler
from hearth.engine.sequence import Sequence, Status
from hearth.engine.types import SamplingParams


def make(prompt: list[int], max_tokens: int = 8, rid: str = "r") -> Sequence:
    return Sequence(rid, 0, prompt, SamplingParams(max_tokens=max_tokens))


def run_step(sched: Scheduler) -> list[Sequence]:
    """One step with a fake model: every sequence that reaches its end gets token 7."""
    plan = sched.schedule()
    sampled = [item.seq for item in plan.scheduled if item.reaches_end]
    sched.after_step(plan)
    finished = []
    for seq in sampled:
        seq.output_ids.append(7)
        if len(seq.output_ids) >= seq.params.max_tokens:
            sched.finish(seq)
            finished.append(seq)
    return finished


def check_invariants(blocks: BlockManager, sched: Scheduler) -> None:
    refs = [0] * blocks.num_blocks
    for seq in sched.running:
        assert len(seq.block_table) * blocks.block_size >= seq.num_computed_tokens
        for block in seq.block_table:
            refs[block] += 1
    for seq in sched.waiting:
        assert not seq.block_table and seq.num_computed_tokens == 0
    assert refs == blocks.ref_counts
    assert set(blocks.free) == {b for b in range(blocks.num_blocks) if refs[b] == 0}


def test_token_budget_chunks_long_prompts_and_decodes_keep_running() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=10)
    short = make([1, 2, 3], max_tokens=50, rid="short")
    sched.add(short)
    run_step(sched)
    assert short.output_ids == [7]
    long = make(list(range(10, 40)), rid="long")  # 30 tokens, budget 10 per step
    sched.add(long)
    for _ in range(4):
        plan = sched.schedule()
        sizes = {item.seq.request_id: item.num_tokens for item in plan.scheduled}
        assert sizes["short"] == 1  # the decode is never starved by the prefill
        assert sum(sizes.values()) <= 10
        sched.after_step(plan)
        for item in plan.scheduled:
            if item.reaches_end:
                item.seq.output_ids.append(7)
    assert long.num_computed_tokens == 30 and long.output_ids == [7]


def test_preempts_newest_when_blocks_run_out_and_never_deadlocks() -> None:
    blocks = BlockManager(6, 4)  # 24 token slots
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [make([i] * 6, max_tokens=12, rid=f"r{i}") for i in range(3)]  # 18 tokens each
    for seq in seqs:
        sched.add(seq)
    done: list[Sequence] = []
    for _ in range(200):
        done += run_step(sched)
        check_invariants(blocks, sched)
        if not sched.has_unfinished():
            break
    assert sorted(s.request_id for s in done) == ["r0", "r1", "r2"]
    assert all(len(s.output_ids) == 12 for s in done)
    assert sched.num_preemptions > 0
    assert blocks.num_free_blocks == 6


def test_prefix_blocks_are_shared_not_recomputed() -> None:
    blocks = BlockManager(32, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    system = list(range(100, 112))  # 3 full blocks
    first = make([*system, 1, 2], rid="a")
    sched.add(first)
    run_step(sched)
    second = make([*system, 3, 4, 5], rid="b")
    sched.add(second)
    plan = sched.schedule()
    item = next(i for i in plan.scheduled if i.seq is second)
    assert second.num_cached_tokens == 12 and item.num_tokens == 3
    assert second.block_table[:3] == first.block_table[:3]
    assert all(blocks.ref_counts[b] == 2 for b in first.block_table[:3])
    assert blocks.num_cache_hits == 12


def test_whole_prompt_cached_still_computes_its_last_token() -> None:
    blocks = BlockManager(32, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    prompt = list(range(8))  # exactly 2 blocks
    sched.add(make(prompt, max_tokens=1, rid="a"))
    run_step(sched)  # finishes: blocks freed but still cached
    again = make(prompt, rid="b")
    sched.add(again)
    plan = sched.schedule()
    assert again.num_cached_tokens == 4 and plan.scheduled[0].num_tokens == 4


def test_freed_cached_blocks_are_reused_for_new_work() -> None:
    blocks = BlockManager(4, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(5):  # each needs all 4 blocks; cached blocks must be evicted
        seq = make([i] * 12, max_tokens=4, rid=f"r{i}")
        sched.add(seq)
        while sched.has_unfinished():
            run_step(sched)
        assert blocks.num_free_blocks == 4


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    num_blocks=st.integers(8, 40),
    block_size=st.sampled_from([1, 2, 4, 16]),
    budget=st.integers(8, 64),
)
def test_random_arrivals_lengths_and_aborts_end_with_every_block_free(
    seed: int, num_blocks: int, block_size: int, budget: int
) -> None:
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(blocks, max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=budget)
    capacity = num_blocks * block_size
    shared = [rng.randrange(50) for _ in range(3 * block_size)]
    pending = []
    for i in range(rng.randint(1, 25)):
        prompt_len = rng.randint(1, max(1, capacity // 2))
        prefix = shared[: rng.randint(0, len(shared))]
        prompt = (prefix + [rng.randrange(50) for _ in range(prompt_len)])[:prompt_len]
        max_tokens = rng.randint(1, max(1, capacity - len(prompt)))
        pending.append(make(prompt, max_tokens, rid=f"r{i}"))
    live: list[Sequence] = []
    for _ in range(5000):
        if pending and rng.random() < 0.3:
            seq = pending.pop()
            sched.add(seq)
            live.append(seq)
        if live and rng.random() < 0.05:  # abort a random live request
            victim = live.pop(rng.randrange(len(live)))
            if not victim.is_finished:
                sched.finish(victim)
        run_step(sched)
        check_invariants(blocks, sched)
        if not pending and not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert blocks.num_free_blocks == num_blocks
    assert all(r == 0 for r in blocks.ref_counts)
    assert all(s.status is Status.FINISHED for s in live)


def test_sequence_token_slices() -> None:
    seq = make([1, 2, 3, 4])
    seq.output_ids += [5, 6]
    whole = seq.token_ids()
    for start in range(7):
        for stop in range(start, 7):
            assert seq.tokens(start, stop) == whole[start:stop]


def test_a_burst_sharing_a_prefix_computes_it_once() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=256)
    system = [9, 8, 7, 6, 5, 4, 3, 2]  # two full blocks every request shares
    burst = [make([*system, 20 + i, 30 + i, 40 + i], rid=f"r{i}") for i in range(4)]
    other = make([1, 1, 1, 1, 1], rid="other")
    for seq in burst:
        sched.add(seq)
    sched.add(other)
    first = sched.schedule()
    # r1-r3 wait a step for r0's prefix blocks; "other" shares nothing and starts now.
    assert [item.seq.request_id for item in first.scheduled] == ["r0", "other"]
    assert [seq.request_id for seq in sched.waiting] == ["r1", "r2", "r3"]
    sched.after_step(first)
    burst[0].output_ids.append(7)  # r0 and other sampled their first tokens
    other.output_ids.append(7)
    second = sched.schedule()
    names = [item.seq.request_id for item in second.scheduled]
    assert names == ["r0", "other", "r1", "r2", "r3"]
    assert [item.num_tokens for item in second.scheduled] == [1, 1, 3, 3, 3]  # prefix cached
    assert blocks.num_cache_hits == 3 * len(system)
    sched.after_step(second)
    check_invariants(blocks, sched)


# -- priorities (vLLM's sense: lower first), holding, preemption, aging ------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def prio(prompt: list[int], priority: int, rid: str, max_tokens: int = 8) -> Sequence:
    return Sequence(rid, 0, prompt, SamplingParams(max_tokens=max_tokens, priority=priority))


def test_waiting_requests_are_admitted_in_priority_order_then_arrival() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=256, clock=Clock())
    for rid, priority in [("batch1", 10), ("batch2", 10), ("live1", 0), ("mid", 5), ("live2", 0)]:
        sched.add(prio([1, 2, 3], priority, rid))
    plan = sched.schedule()
    assert [i.seq.request_id for i in plan.scheduled] == ["live1", "live2"]
    assert [s.request_id for s in sched.waiting] == ["mid", "batch1", "batch2"]
    assert sched.waiting_by_priority() == {5: 1, 10: 2}


def test_one_priority_is_plain_fcfs() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=256, clock=Clock())
    for i in range(4):
        sched.add(prio([i, 1, 2], 3, f"r{i}"))
    assert [i.seq.request_id for i in sched.schedule().scheduled] == ["r0", "r1", "r2", "r3"]


def test_a_live_prompt_holds_lower_decodes_for_its_prefill_step_only() -> None:
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=256, clock=Clock())
    batch = [prio([i, 9, 9], 10, f"b{i}", max_tokens=50) for i in range(3)]
    for seq in batch:
        sched.add(seq)
    run_step(sched)  # the batch lines prefill and sample
    live = prio([5, 6, 7, 8, 9], 0, "live")
    late = prio([3, 3, 3], 10, "b-late", max_tokens=50)
    sched.add(late)
    sched.add(live)
    plan = sched.schedule()
    # the batch decodes wait, and no batch line starts in the live prompt's step
    assert [i.seq.request_id for i in plan.scheduled] == ["live"]
    assert list(sched.waiting) == [late]
    assert all(s.status is Status.RUNNING for s in batch)  # held, not preempted: KV kept
    assert sched.num_preemptions == 0
    sched.after_step(plan)
    live.output_ids.append(7)
    # Now live decodes with at most lower_share (2) batch sequences a step, in turn; the late
    # batch line waits for a free place.
    seen = []
    for _ in range(3):
        plan = sched.schedule()
        names = [i.seq.request_id for i in plan.scheduled]
        assert names[0] == "live" and len(names) == 3
        seen += names[1:]
        sched.after_step(plan)
        for item in plan.scheduled:
            item.seq.output_ids.append(7)
    assert seen == ["b0", "b1", "b2", "b0", "b1", "b2"]
    assert list(sched.waiting) == [late]
    sched.finish(live)  # no better work left: within RECENT_S the share still holds (the
    plan = sched.schedule()  # next live request of a client usually follows soon)
    assert len(plan.scheduled) == 2 and "b-late" not in [i.seq.request_id for i in plan.scheduled]
    sched.after_step(plan)
    for item in plan.scheduled:
        item.seq.output_ids.append(7)
    sched.clock.now += RECENT_S + 0.1  # then the batch runs freely again
    plan = sched.schedule()
    assert [i.seq.request_id for i in plan.scheduled] == ["b0", "b1", "b2", "b-late"]
    check_invariants(blocks, sched)


def test_a_live_arrival_preempts_the_worst_running_when_slots_or_blocks_are_short() -> None:
    blocks = BlockManager(8, 4)  # 32 token slots
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=256, clock=Clock())
    low = [prio([i] * 8, 10, f"b{i}", max_tokens=20) for i in range(2)]
    for seq in low:
        sched.add(seq)
    run_step(sched)
    live = prio([3] * 8, 0, "live")
    sched.add(live)
    plan = sched.schedule()  # max_num_seqs is full: the newest batch line makes room
    assert [i.seq.request_id for i in plan.scheduled] == ["live"]
    assert plan.preempted == [low[1]] and low[1].status is Status.WAITING
    assert low[1].num_computed_tokens == 0 and not low[1].block_table  # recompute later
    sched.after_step(plan)
    check_invariants(blocks, sched)
    # An equal-priority arrival never preempts: it waits.
    other = prio([4] * 8, 10, "b-late")
    sched.add(other)
    for _ in range(3):
        run_step(sched)
        assert low[0].status is Status.RUNNING
    # Blocks short: a 28-token live prompt preempts running batch work to fit.
    sched2 = Scheduler(BlockManager(8, 4), max_num_seqs=8, max_num_batched_tokens=256)
    big = prio(list(range(20)), 10, "big", max_tokens=8)
    sched2.add(big)
    run_step(sched2)
    urgent = prio(list(range(30, 58)), 0, "urgent", max_tokens=1)
    sched2.add(urgent)
    plan = sched2.schedule()
    assert plan.preempted == [big] and [i.seq for i in plan.scheduled] == [urgent]


def test_aging_bounds_starvation_under_a_steady_live_stream() -> None:
    clock = Clock()
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=1, max_num_batched_tokens=256, aging_s=1.0, clock=clock)
    batch = prio([1, 2, 3], 5, "batch", max_tokens=1)
    sched.add(batch)
    sched.add(prio([4, 5, 6], 0, "live0", max_tokens=1))
    waited = 0
    for step in range(1, 100):
        clock.now += 0.5  # a live request arrives every half second, forever
        sched.add(prio([4, 5, step], 0, f"live{step}", max_tokens=1))
        done = run_step(sched)
        if batch in done:
            waited = clock.now
            break
    # Priority 5 ages one level a second: within ~5 s it ties the live requests and, being
    # older than every live arrival after it, goes first.
    assert batch.is_finished and waited <= 5 * 1.0 + 1.0


def test_aged_work_is_neither_held_nor_preempted() -> None:
    clock = Clock()
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=256, aging_s=1.0, clock=clock)
    batch = prio([1, 2, 3], 3, "batch", max_tokens=50)
    sched.add(batch)
    run_step(sched)
    clock.now = 10.0  # aged past its 3 levels
    sched.add(prio([4, 5, 6], 0, "live"))
    names = [i.seq.request_id for i in sched.schedule().scheduled]
    assert sorted(names) == ["batch", "live"]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(8, 40), budget=st.integers(8, 64))
def test_random_priorities_end_with_every_request_done_and_every_block_free(
    seed: int, num_blocks: int, budget: int
) -> None:
    rng = random.Random(seed)
    clock = Clock()
    blocks = BlockManager(num_blocks, 4)
    sched = Scheduler(blocks, rng.randint(1, 6), budget, aging_s=0.5, clock=clock)
    capacity = num_blocks * 4
    pending = []
    for i in range(rng.randint(1, 20)):
        prompt = [rng.randrange(50) for _ in range(rng.randint(1, capacity // 2))]
        max_tokens = rng.randint(1, max(1, capacity - len(prompt)))
        pending.append(prio(prompt, rng.choice([0, 0, 1, 10]), f"r{i}", max_tokens))
    done: list[Sequence] = []
    for _ in range(20_000):
        clock.now += 0.01
        if pending and rng.random() < 0.3:
            sched.add(pending.pop())
        done += run_step(sched)
        check_invariants(blocks, sched)
        if not pending and not sched.has_unfinished():
            break
    assert not sched.has_unfinished()
    assert blocks.num_free_blocks == num_blocks


def test_a_lower_sequences_blocks_are_taken_again_first() -> None:
    """A finished lower-priority sequence's blocks go to the head of the free list, so the
    next allocations reuse them before a live request's cached prefix blocks."""
    blocks = BlockManager(16, 4)
    sched = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=256, clock=Clock())
    live = prio(list(range(8)), 0, "live")  # two full blocks, cached once computed
    batch = prio(list(range(100, 108)), 10, "batch")
    sched.add(live)
    sched.add(batch)
    sched.after_step(sched.schedule())
    live_blocks, batch_blocks = list(live.block_table), list(batch.block_table)
    sched.finish(live)  # cached, free at the tail (LRU)
    sched.finish(batch)  # lower: first in line again, its tail block first
    first = list(blocks.free)[: len(batch_blocks)]
    assert first == list(reversed(batch_blocks))
    assert not set(first) & set(live_blocks)
    assert blocks.cached_prefix(prio(list(range(8)), 0, "again"), blocks.prefix_keys(live))
