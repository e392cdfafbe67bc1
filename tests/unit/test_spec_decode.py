"""Speculative decoding's torch-free parts: n-gram lookup, the scheduler's lookahead slots and
their rollback, the models.yaml entry, the request opt-out and the /metrics counters."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from hearth.engine.block_manager import BlockManager
from hearth.engine.config import ConfigError, parse_config
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence
from hearth.engine.spec_decode.ngram import NgramProposer, lookup
from hearth.engine.types import EngineStats, SamplingParams
from tests.unit.test_scheduler import check_invariants
from tests.unit.test_server import chat, make_client


def test_lookup_continues_the_latest_longest_match() -> None:
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 2, 3, 4]
    assert lookup(tokens, 3, 1, 3) == [6, 7, 2]  # the latest "2 3 4" is followed by 6 7
    assert lookup(tokens, 1, 1, 3) == [6]
    assert lookup([1, 2, 3, 4], 3, 1, 3) == []  # nothing repeats
    assert lookup([5, 5, 5], 4, 2, 2) == [5]  # the earlier "5 5" is followed by one 5
    assert lookup([1, 2, 3, 1, 9, 2, 3], 3, 2, 2) == [1, 9, 2]  # "2 3" once before


def test_ngram_proposer_searches_prompt_and_output() -> None:
    seq = Sequence("r", 0, [10, 11, 12, 13, 14], SamplingParams())
    seq.output_ids = [11, 12]
    [proposal] = NgramProposer(2, 3).propose([seq], [2])
    assert proposal.token_ids == [13, 14] and proposal.probs is None


def decoding(blocks: BlockManager, sched: Scheduler, prompt: list[int]) -> Sequence:
    seq = Sequence("r", 0, prompt, SamplingParams(max_tokens=100))
    sched.add(seq)
    plan = sched.schedule()
    sched.after_step(plan)
    seq.output_ids.append(7)  # the prefill's token: now a decode
    return seq


def test_lookahead_slots_then_rollback_of_rejected_drafts() -> None:
    blocks = BlockManager(16, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    seq = decoding(blocks, sched, [1, 2, 3])  # 4 tokens, 3 computed, 1 block
    seq.spec_token_ids = [8, 9, 10, 11]
    plan = sched.schedule()
    [item] = plan.scheduled
    assert (item.num_tokens, item.num_spec, item.reaches_end) == (5, 4, True)
    assert len(seq.block_table) == 2  # 8 slots for 3 + 1 + 4 tokens
    sched.after_step(plan)
    assert seq.num_computed_tokens == 4  # drafts count only once verified
    seq.output_ids += [8, 12]  # one draft accepted, then the target's own token
    sched.accept_drafts(seq, 1)
    assert seq.num_computed_tokens == 5 and len(seq.block_table) == 2
    check_invariants(blocks, sched)
    seq.spec_token_ids = [13]  # a rejected draft in a fresh block is given back
    seq.output_ids.append(14)
    sched.after_step(sched.schedule())  # computes 12 and 13 (5 + 2 tokens)
    seq.output_ids[-1:] = [15]  # 14 was only the placeholder: the draft is rejected
    sched.accept_drafts(seq, 0)
    assert len(seq.block_table) == blocks.blocks_for(seq.num_computed_tokens)
    check_invariants(blocks, sched)


def test_lookahead_that_does_not_fit_is_dropped_not_preempting() -> None:
    blocks = BlockManager(2, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=64)
    seq = decoding(blocks, sched, [1, 2, 3])
    seq.spec_token_ids = [8, 9, 10, 11, 12]  # needs a third block: there is none
    [item] = sched.schedule().scheduled
    assert (item.num_tokens, item.num_spec) == (1, 0)
    assert sched.num_preemptions == 0


def test_speculative_entry_in_models_yaml() -> None:
    model = {"id": "m", "source": "x.gguf"}
    spec = {"method": "ngram", "num_speculative_tokens": 5}
    parsed = parse_config({"models": [{**model, "speculative": spec}]})
    assert parsed.models[0].speculative.num_speculative_tokens == 5
    assert parsed.models[0].speculative.max_batch is None  # measured
    with pytest.raises(ConfigError, match="draft"):
        parse_config({"models": [{**model, "speculative": {"method": "draft"}}]})
    with pytest.raises(ConfigError, match="method"):
        parse_config({"models": [{**model, "speculative": {"method": "eagle"}}]})


def test_a_request_can_opt_out() -> None:
    client, engine = make_client()
    assert chat(client, speculative=False).status_code == 200
    assert engine.requests[-1].sampling.speculative is False
    assert chat(client).status_code == 200
    assert engine.requests[-1].sampling.speculative is True


def test_metrics_show_proposed_accepted_and_the_rate() -> None:
    from prometheus_client import generate_latest

    from hearth.server.metrics import Metrics

    def engine(model: str, proposed: int, accepted: int) -> SimpleNamespace:
        stats = EngineStats(
            0, 0, 0, 1, spec_proposed_tokens=proposed, spec_accepted_tokens=accepted
        )
        return SimpleNamespace(
            info=SimpleNamespace(model_id=model, task="generate"), stats=lambda: stats
        )

    page = generate_latest(Metrics(lambda: [engine("a", 40, 30), engine("b", 0, 0)]).registry)
    text = page.decode()
    assert 'hearth_spec_decode_draft_tokens_total{model="a"} 40.0' in text
    assert 'hearth_spec_decode_accepted_tokens_total{model="a"} 30.0' in text
    assert 'hearth_spec_decode_acceptance_ratio{model="a"} 0.75' in text
    assert 'model="b"' not in text.split("hearth_spec_decode")[-1]
