"""Scheduler and block manager on their own (torch-free): budgets, preemption, prefix reuse."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.engine.block_manager import BlockManager
from hearth.engine.scheduler import Scheduler
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
