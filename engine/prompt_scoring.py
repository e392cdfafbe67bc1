"""Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's extension; echo scoring in legacy
completions): stored per prompt position as prefill chunks are computed, sent once.

A sequence asking for them carries `state.prompt_logprobs`: one entry per prompt position
(`None` for the first, which nothing predicts), filled by `store` from the runner's
prompt-position logits; a recompute after preemption overwrites its own entries. The first
output of the sample takes them (`take`). A request with `max_tokens: 0` only scores its prompt
and ends right after prefill (`finish_scored`).
"""

from __future__ import annotations

import logging

from hearth.engine.runner import PromptRows
from hearth.engine.sampler import prompt_logprobs_of
from hearth.engine.scheduler import Scheduler
from hearth.engine.sequence import Sequence, Status
from hearth.engine.types import GenerationOutput, TokenLogprob, ended_output

log = logging.getLogger("hearth.engine")


def store(parts: list[PromptRows], failed: dict[str, str]) -> dict[str, str]:
    """Store the prompt logprobs of this step's chunks (`parts`: each chunk's logits
    [chunk_len, vocab] for the positions that predict a prompt token); returns
    {request id: error} for the requests whose scoring failed (their request alone fails)."""
    errors: dict[str, str] = {}
    for part in parts:
        seq = part.seq
        if seq.request_id in failed or seq.state.prompt_logprobs is None:  # sent already
            continue
        try:
            targets = seq.prompt_ids[part.first : part.first + len(part.logits)]
            k = seq.params.prompt_logprobs or 0
            scores = prompt_logprobs_of(part.logits, targets, k)
            seq.state.prompt_logprobs[part.first : part.first + len(scores)] = scores
        except Exception as exc:
            log.exception("request %s failed scoring its prompt", seq.request_id)
            errors[seq.request_id] = f"engine error: {type(exc).__name__}: {exc}"
    return errors


def take(seq: Sequence) -> list[TokenLogprob | None] | None:
    """The sample's prompt logprobs, the first time they are asked for; then None."""
    scores, seq.state.prompt_logprobs = seq.state.prompt_logprobs, None
    return scores


def finish_scored(scheduler: Scheduler, seq: Sequence) -> list[GenerationOutput]:
    """Finish a max_tokens=0 request right after its prefill (scoring only): every sample ends
    with "length", no token, and the prompt logprobs."""
    scheduler.finish(seq)
    scores = take(seq)
    outputs = []
    for one in [seq, *seq.state.siblings]:
        one.status, one.finish_reason = Status.FINISHED, "length"
        out = ended_output(one.request_id, one.index, "length", None, len(one.prompt_ids))
        out.prompt_logprobs = scores
        outputs.append(out)
    seq.state.siblings = []
    return outputs
