"""Synchronous engine core: schedule a step, run it, sample, and emit per-sample outputs.

Longer than ~300 lines on purpose: one class, `EngineCore`, whose request lifecycle (admit,
step, finish or fail) reads top to bottom; the work itself lives in the scheduler, the runner,
the sampler and, for speculative decoding, engine/spec_decode/ (the core only appends the
tokens a verification kept, one output for them all).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from hearth.engine import prompt_scoring
from hearth.engine.block_manager import BlockManager
from hearth.engine.config import EngineSettings
from hearth.engine.constrained.closing import ClosingState
from hearth.engine.constrained.grammar import GrammarCompiler
from hearth.engine.constrained.think import BlockScan
from hearth.engine.lora import lora_manager
from hearth.engine.runner import ModelRunner, PromptRows
from hearth.engine.sampler import Sampler, SamplerOutput, SamplingRow
from hearth.engine.scheduler import Scheduled, Scheduler, SchedulerOutput
from hearth.engine.sequence import Sequence, Status
from hearth.engine.spec_decode import switch
from hearth.engine.spec_decode.speculator import Speculator, Verified
from hearth.engine.text.detokenizer import IncrementalDetokenizer
from hearth.engine.text.tokenizer import ChatTokenizer
from hearth.engine.types import (
    EngineStats,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    TokenLogprob,
    ended_output,
)

log = logging.getLogger("hearth.engine")


class FatalStepError(RuntimeError):
    """A step failed in a way the engine cannot recover from (the engine thread stops)."""


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed accepts


@dataclass
class _SeqState:
    """Per-sequence state that needs torch or the tokenizer (the scheduler never sees it)."""

    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    siblings: list[Sequence]  # samples 1..n-1, admitted once this one's prompt is computed
    matcher: Any = None  # llguidance matcher when the request has a grammar
    closing: ClosingState | None = None  # how that grammar completes within the budget
    # prompt_logprobs requests: one entry per prompt position, filled as chunks are computed
    # (a recompute after preemption overwrites them), sent once with the first output
    prompt_logprobs: list[TokenLogprob | None] | None = None


class EngineCore:
    """Owns the scheduler, the KV blocks and the model runner; stepped by one thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: ChatTokenizer,
        settings: EngineSettings,
        max_model_len: int,
        num_blocks: int,
        dtype: torch.dtype,
        tp_size: int = 1,
        speculator: Speculator | None = None,
    ) -> None:
        """`speculator`: the model's speculative decoding (engine/spec_decode/), if any; a
        `max_batch` left None is measured on this host (switch.py)."""
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len
        self.blocks = BlockManager(num_blocks, settings.block_size)
        self.scheduler = Scheduler(
            self.blocks, settings.max_num_seqs, settings.max_num_batched_tokens
        )
        self.runner = ModelRunner(model, num_blocks, dtype, settings, max_model_len, tp_size)
        self.device = self.runner.device
        self.vocab_size = model.config.get_text_config().vocab_size
        self._stop_ids = tokenizer.eos_token_ids
        self.grammars = GrammarCompiler(tokenizer.hf, self.vocab_size, self._stop_ids)
        self.sampler = Sampler(self._stop_ids, self.grammars)
        self.num_prefilled_tokens = 0
        self.last_step_tokens = 0  # tokens the last step computed
        self.loras = self.runner.loras = lora_manager(model, settings, tp_size)
        self.blocks.cache_root = self.loras.cache_root  # adapters never share KV blocks
        self.scheduler.admissible = self.loras.admissible  # at most max_loras adapters running
        self.spec = speculator
        if speculator is not None and speculator.max_batch is None:
            measured = switch.max_batch(self.runner, speculator.num_tokens, settings)
            speculator.max_batch, speculator.costs = measured

    @property
    def kv_capacity_tokens(self) -> int:
        return self.blocks.num_blocks * self.blocks.block_size

    def idle(self, stop: Callable[[], bool] | None = None) -> None:
        """At an idle moment (nothing unfinished): re-measure the kernels when the served
        steps ran far slower than the autotune decision's figures (engine/kernels/
        autotune_noise.py); that writes the KV cache, so the cached prefixes are dropped.
        `stop`: asked between timed steps, True ends the re-measure (work arrived)."""
        if self.runner.retune_due and not self.has_unfinished():
            self.runner.retune(stop)
            self.blocks.forget_cached()

    # -- requests -------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """Raise InvalidRequestError for a request this engine can never serve."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise InvalidRequestError("the prompt is empty")
        total = prompt_len + request.sampling.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {prompt_len} tokens and max_tokens is "
                f"{request.sampling.max_tokens} ({total} in all)"
            )
        if total > self.kv_capacity_tokens:
            capacity = self.kv_capacity_tokens
            raise InvalidRequestError(f"request needs {total} KV slots; the cache holds {capacity}")
        if request.multimodal is not None and self.runner.vision is None:
            raise InvalidRequestError("this model reads text only: no images", "messages")
        if any(not 0 <= t < self.vocab_size for t in request.prompt_token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {self.vocab_size})", "prompt"
            )
        if any(not 0 <= t < self.vocab_size for t in request.sampling.stop_token_ids):
            raise InvalidRequestError(
                f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids"
            )
        if any(not 0 <= t < self.vocab_size for t in request.sampling.logit_bias):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in [0, {self.vocab_size})", "logit_bias"
            )
        self.loras.check(request.sampling.lora)
        seed = request.sampling.seed
        if seed is not None and not SEED_MIN <= seed <= SEED_MAX - request.sampling.n:
            raise InvalidRequestError(
                f"seed must be in [{SEED_MIN}, {SEED_MAX - request.sampling.n}]", "seed"
            )

    def add_request(self, request: GenerationRequest) -> None:
        self.check_request(request)
        params = request.sampling
        seqs = []
        for index in range(params.n):
            generator = None
            if params.seed is not None and not params.greedy:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            seq = Sequence(request.request_id, index, list(request.prompt_token_ids), params)
            seq.mm = request.multimodal  # the samples share its encoded images
            matcher, closing = None, None
            if params.grammar:
                matcher = self.grammars.matcher(params.grammar)
                block = BlockScan.of(params.grammar.think)
                free = params.grammar.kind == "text"
                closing = ClosingState(matcher, block=block, free_answer=free)
            seq.state = _SeqState(
                IncrementalDetokenizer(self.tokenizer.decode, params.stop),
                generator,
                [],
                matcher,
                closing,
            )
            if params.prompt_logprobs is not None:
                seq.state.prompt_logprobs = [None] * len(seq.prompt_ids)
            seqs.append(seq)
        seqs[0].state.siblings = seqs[1:]  # they share the first sample's prefill
        self.scheduler.add(seqs[0])

    def abort(self, request_id: str) -> list[GenerationOutput]:
        """Drop every sample of the request; returns their final 'abort' outputs."""
        return self._finish_matching(lambda s: s.request_id == request_id, "abort")

    def fail_all(self, message: str, retryable: bool = False) -> list[GenerationOutput]:
        """Finish every sequence with an error: an unexpected failure, or (retryable) the
        server shutting down."""
        return self._finish_matching(lambda s: True, "error", message, retryable)

    def fail_requests(self, errors: dict[str, str]) -> list[GenerationOutput]:
        """Finish every sample of each request id with its error message; frees their blocks."""
        outputs = []
        for request_id, message in errors.items():
            outputs += self._finish_matching(
                lambda s, r=request_id: s.request_id == r, "error", message
            )
        return outputs

    def _finish_matching(
        self,
        match: Callable[[Sequence], bool],
        reason: FinishReason,
        error: str | None = None,
        retryable: bool = False,
    ) -> list[GenerationOutput]:
        outputs = []
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            if not match(seq):
                continue
            self.scheduler.finish(seq)
            for one in [seq, *seq.state.siblings]:  # siblings not yet admitted end with it
                one.status, one.finish_reason = Status.FINISHED, reason
                sizes = len(one.prompt_ids), len(one.output_ids)
                outputs.append(
                    ended_output(one.request_id, one.index, reason, error, *sizes, retryable)
                )
            seq.state.siblings = []
        return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_total=self.blocks.num_blocks,
            prefix_cache_hits=self.blocks.num_cache_hits,
            num_prefilled_tokens=self.num_prefilled_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            spec_proposed_tokens=0 if self.spec is None else self.spec.num_proposed,
            spec_accepted_tokens=0 if self.spec is None else self.spec.num_accepted,
            waiting_by_priority=self.scheduler.waiting_by_priority(),
        )

    # -- stepping -------------------------------------------------------------------------
    def step(self) -> list[GenerationOutput]:
        """One step: schedule -> execute -> sample -> append. A failure fails only the requests
        it can be pinned on: a forward's (see _execute), the batch's sampling, one append."""
        if self.spec is not None:  # draft tokens for the decodes that may speculate
            self.spec.propose(self.scheduler.running, self._budget_left)
        plan = self.scheduler.schedule()
        self.last_step_tokens = plan.num_tokens  # engine/threads.py keys step times by it
        if not plan.scheduled:
            return self._unschedulable()
        logits, parts, failed = self._execute(plan)
        failed.update(prompt_scoring.store(parts, failed))
        outputs = self.fail_requests(failed)
        ending = self._computed(plan, failed)
        outputs += [
            o
            for i in ending
            if i.seq.params.max_tokens == 0
            for o in prompt_scoring.finish_scored(self.scheduler, i.seq)
        ]
        plain, rows, drafted, row = [], [], [], 0  # logits rows: 1 + num_spec per item
        for item in ending:
            if item.seq.params.max_tokens > 0 and item.num_spec:
                drafted.append((item, row))
            elif item.seq.params.max_tokens > 0:
                plain.append(item.seq)
                rows.append(row)
            row += 1 + item.num_spec
        if not plain and not drafted:
            return outputs
        try:
            if len(rows) != row:  # some rows are drafts' or not sampled: pick the plain ones
                logits_plain = logits[torch.tensor(rows, dtype=torch.long, device=logits.device)]
            else:
                logits_plain = logits
            sampled = self._sample(plain, logits_plain) if plain else None
            verified = self.spec.verify(self.sampler, logits, drafted) if drafted else []
        except Exception as exc:  # sampling the batch failed: fail the requests that sampled
            log.exception("sampling failed")
            message = _describe(exc)
            seqs = plain + [i.seq for i, _ in drafted]
            return outputs + self.fail_requests({s.request_id: message for s in seqs})
        if sampled is not None:
            outputs += self._append_all(plain, sampled)
        return outputs + self._append_verified([i.seq for i, _ in drafted], verified)

    def _unschedulable(self) -> list[GenerationOutput]:
        """Nothing fits this step: a waiting head that can never fit fails (not everything)."""
        if self.scheduler.waiting and not self.scheduler.running:
            head = self.scheduler.waiting[0].request_id
            return self.fail_requests({head: "no KV blocks for this request"})
        return []

    def _execute(
        self, plan: SchedulerOutput
    ) -> tuple[torch.Tensor, list[PromptRows], dict[str, str]]:
        """The step's logits, the prompt-position logits of prompt_logprobs requests, and
        {request id: error} for requests whose forward fails.

        A failed batch is retried one sequence at a time (the forward only reads the cache and
        writes each sequence's own slots, so a rerun is safe): the requests that still fail are
        the ones to blame, and the rest of the batch goes on as if nothing had happened.
        """
        try:
            return *self.runner.execute(plan.scheduled), {}
        except Exception as exc:
            if self.runner.tp_size > 1:  # the other ranks are mid-collective: no safe retry
                raise FatalStepError(f"tensor-parallel step failed: {_describe(exc)}") from exc
            if len(plan.scheduled) == 1:
                log.exception("request %s failed in a step", plan.scheduled[0].seq.request_id)
                return self._no_logits(), [], {plan.scheduled[0].seq.request_id: _describe(exc)}
            log.warning("a step of %d sequences failed; retrying each alone", len(plan.scheduled))
        rows: list[tuple[str, torch.Tensor]] = []
        parts: list[PromptRows] = []
        failed: dict[str, str] = {}
        for item in plan.scheduled:
            try:
                logits, item_parts = self.runner.execute([item])
                rows.append((item.seq.request_id, logits))
                parts += item_parts
            except Exception as exc:
                log.exception("request %s failed in a step", item.seq.request_id)
                failed[item.seq.request_id] = _describe(exc)
        kept = [r for rid, r in rows if rid not in failed]
        return (torch.cat(kept) if kept else self._no_logits()), parts, failed

    def _no_logits(self) -> torch.Tensor:
        return torch.empty(0, self.vocab_size, device=self.device)

    def _computed(self, plan: SchedulerOutput, failed: dict[str, str]) -> list[Scheduled]:
        """Record the forward of the sequences that did not fail (prefill counts, the
        scheduler's progress); returns the items that reached their end: they sample."""
        if failed:
            plan.scheduled = [i for i in plan.scheduled if i.seq.request_id not in failed]
        sampling = [item for item in plan.scheduled if item.reaches_end]
        for item in plan.scheduled:
            prompt_left = item.seq.num_prompt_tokens - item.seq.num_computed_tokens
            self.num_prefilled_tokens += max(0, min(item.num_tokens, prompt_left))
        self.scheduler.after_step(plan)
        return sampling

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SamplerOutput:
        """The Sampler's tokens and logprobs for `seqs` (one row of `logits` each), on the host."""
        rows = [
            SamplingRow(
                s.params,
                s.prompt_ids,
                s.output_ids,
                s.state.generator,
                s.state.matcher,
                s.state.closing,
                self._budget_left(s),
            )
            for s in seqs
        ]
        return self.sampler(logits, rows)

    def _append_all(self, seqs: list[Sequence], sampled: SamplerOutput) -> list[GenerationOutput]:
        """Append each sampled token to its sequence; a failure (e.g. detokenizing) fails that
        request only."""
        outputs = []
        failed: dict[str, str] = {}
        for seq, token_id, logprobs in zip(seqs, sampled.token_ids, sampled.logprobs, strict=True):
            try:
                outputs.append(self._append(seq, token_id, logprobs))
            except Exception as exc:
                log.exception("request %s failed after sampling", seq.request_id)
                failed[seq.request_id] = _describe(exc)
        if failed:
            outputs = [o for o in outputs if o.request_id not in failed]
            outputs += self.fail_requests(failed)
        return outputs

    def _append_verified(
        self, seqs: list[Sequence], verified: list[Verified]
    ) -> list[GenerationOutput]:
        """Append each speculating sequence's kept tokens (one output carrying them all, as
        far as a stop allows), then roll its cache back to them; a failure fails that request."""
        outputs = []
        failed: dict[str, str] = {}
        for seq, kept in zip(seqs, verified, strict=True):
            try:
                parts = []
                for i, token_id in enumerate(kept.token_ids):
                    logprobs = None if kept.logprobs is None else kept.logprobs[i : i + 1]
                    parts.append(self._append(seq, token_id, logprobs))
                    if seq.finish_reason is not None:
                        break
                self.scheduler.accept_drafts(seq, len(parts) - 1)
                outputs.append(_merged(parts))
            except Exception as exc:
                log.exception("request %s failed after verifying drafts", seq.request_id)
                failed[seq.request_id] = _describe(exc)
        if failed:
            outputs = [o for o in outputs if o.request_id not in failed]
            outputs += self.fail_requests(failed)
        return outputs

    def _budget_left(self, seq: Sequence) -> int:
        """Tokens this sample may still generate."""
        left = seq.params.max_tokens - len(seq.output_ids)
        return min(left, self.max_model_len - seq.num_tokens)

    def _append(
        self, seq: Sequence, token_id: int, logprobs: list[TokenLogprob] | None
    ) -> GenerationOutput:
        params, state = seq.params, seq.state
        if not seq.output_ids and state.siblings:  # prompt computed: siblings reuse its blocks
            for sibling in reversed(state.siblings):
                self.scheduler.add(sibling, front=True)
            state.siblings = []
        seq.output_ids.append(token_id)
        reason: FinishReason | None = None
        is_eos = token_id in self._stop_ids and not params.ignore_eos
        if is_eos or token_id in params.stop_token_ids:
            reason, text = "stop", ""  # the stop token itself is not part of the text
        else:
            text = state.detokenizer.push([token_id])
            if state.detokenizer.stopped:
                reason = "stop"
        # A complete grammar ends the sample (a refused token cannot happen under the mask).
        matcher = state.matcher
        if (
            matcher is not None
            and reason is None
            and (not matcher.consume_token(token_id) or matcher.is_stopped())
        ):
            reason = "stop"
        elif matcher is not None and reason is None:
            self.grammars.closer.advance(state.closing, token_id)
        if reason is None and self._budget_left(seq) <= 0:
            reason = "length"
        if reason is not None:
            text += state.detokenizer.finish()
            self.scheduler.finish(seq)
            seq.finish_reason = reason
        return GenerationOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=[token_id],
            text=text,
            num_prompt_tokens=len(seq.prompt_ids),
            num_completion_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason,
            logprobs=logprobs,
            prompt_logprobs=prompt_scoring.take(seq),
            num_cached_tokens=min(seq.num_cached_tokens, len(seq.prompt_ids)),
        )


def _merged(parts: list[GenerationOutput]) -> GenerationOutput:
    """One output for a sample's tokens of one step (the last part's totals and finish)."""
    last = parts[-1]
    if len(parts) == 1:
        return last
    last.token_ids = [t for p in parts for t in p.token_ids]
    last.text = "".join(p.text for p in parts)
    if last.logprobs is not None:
        last.logprobs = [lp for p in parts for lp in p.logprobs or []]
    last.prompt_logprobs = parts[0].prompt_logprobs
    return last


def _describe(exc: Exception) -> str:
    return f"engine error: {type(exc).__name__}: {exc}"
