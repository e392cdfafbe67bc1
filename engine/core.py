"""Synchronous engine core: admit requests, step the model, emit per-sample outputs.

This is the thin first version: each sequence keeps a transformers DynamicCache and is stepped
on its own. The paged KV cache and the batched scheduler replace its internals (issue 3); the
interface (add_request / abort / step / stats) stays.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from engine.config import EngineLimits
from engine.detokenizer import IncrementalDetokenizer
from engine.sampling import logprobs_of, sample
from engine.tokenizer import ChatTokenizer
from engine.types import (
    EngineStats,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger("hearth.engine")


@dataclass
class Sequence:
    """One sample of a request: its prompt, its outputs so far, and its decoding state."""

    request_id: str
    index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    output_ids: list[int] = field(default_factory=list)
    cache: DynamicCache | None = None
    finish_reason: FinishReason | None = None

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_tokens


def kv_bytes_per_token(model: PreTrainedModel, dtype: torch.dtype) -> int:
    """Bytes of K and V for one token across all layers."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype.itemsize


def kv_budget_bytes(limits: EngineLimits, device: torch.device) -> int:
    """CPU: the configured bytes (1 GiB default). CUDA: a fraction of memory, less what is used."""
    if limits.kv_cache_memory is not None:
        return int(limits.kv_cache_memory)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        return max(0, int(total * limits.gpu_memory_utilization) - used)
    return 1 << 30


class EngineCore:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: ChatTokenizer,
        limits: EngineLimits,
        max_model_len: int,
        kv_capacity_tokens: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        self.device = next(model.parameters()).device
        # transformers >= 5.2x names the cache argument `cache`; older 5.x `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._reserved = 0
        self._prefilled = 0
        self._generated = 0

    # -- requests -------------------------------------------------------------------------
    def check_request(self, request: GenerationRequest) -> None:
        """Raise ValueError for a request this engine can never serve."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise ValueError("the prompt is empty")
        total = prompt_len + request.sampling.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens; "
                f"the prompt has {prompt_len} tokens and max_tokens is "
                f"{request.sampling.max_tokens} ({total} in all)"
            )
        if total > self.kv_capacity_tokens:
            raise ValueError(
                f"request needs {total} KV tokens; capacity is {self.kv_capacity_tokens}"
            )
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def add_request(self, request: GenerationRequest) -> None:
        self.check_request(request)
        params = request.sampling
        for index in range(params.n):
            generator = None
            if params.seed is not None and not params.greedy:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            detokenizer = IncrementalDetokenizer(self.tokenizer.decode, params.stop)
            self.waiting.append(
                Sequence(
                    request.request_id,
                    index,
                    list(request.prompt_token_ids),
                    params,
                    detokenizer,
                    generator,
                )
            )

    def abort(self, request_id: str) -> list[GenerationOutput]:
        """Drop every sample of the request; returns their final 'abort' outputs."""
        dropped = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        self.waiting = deque(s for s in self.waiting if s.request_id != request_id)
        outputs = []
        for seq in dropped:
            self._release(seq)
            seq.finish_reason = "abort"
            outputs.append(self._output(seq, [], "", None))
        return outputs

    def fail_all(self, message: str) -> list[GenerationOutput]:
        """Finish every sequence with an error (after a failed step)."""
        outputs = []
        for seq in [*self.waiting, *self.running]:
            self._release(seq)
            seq.finish_reason = "error"
            outputs.append(self._output(seq, [], "", None, error=message))
        self.waiting.clear()
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        block = self.limits.block_size
        return EngineStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_blocks_used=-(-self._reserved // block),
            kv_blocks_total=self.kv_capacity_tokens // block,
            kv_block_size=block,
            num_prefilled_tokens=self._prefilled,
            num_generated_tokens=self._generated,
        )

    # -- stepping -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[GenerationOutput]:
        admitted = self._admit()
        outputs = []
        for seq in list(self.running):
            if seq in admitted:
                input_ids = seq.prompt_ids
                self._prefilled += len(input_ids)
            else:
                input_ids = seq.output_ids[-1:]
            logits = self._forward(seq, input_ids)  # [1, V]
            outputs.append(self._append(seq, logits))
        return outputs

    def _admit(self) -> list[Sequence]:
        admitted = []
        while self.waiting and len(self.running) < self.limits.max_num_seqs:
            seq = self.waiting[0]
            if self._reserved + seq.reserved_tokens > self.kv_capacity_tokens:
                break
            self.waiting.popleft()
            self._reserved += seq.reserved_tokens
            seq.cache = DynamicCache(config=self.model.config)
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def _forward(self, seq: Sequence, input_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([input_ids], device=self.device)  # [1, S]
        kwargs = {self._cache_arg: seq.cache}
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1, :]  # [1, V]

    def _append(self, seq: Sequence, logits: torch.Tensor) -> GenerationOutput:
        params = seq.sampling
        if len(seq.output_ids) < params.min_tokens and not params.ignore_eos:
            logits[:, list(self.tokenizer.eos_token_ids | set(params.stop_token_ids))] = float(
                "-inf"
            )
        token = sample(logits, [params], [seq.generator])  # [1]
        token_id = int(token.item())
        logprobs = None
        if params.logprobs is not None:
            chosen, top_values, top_ids = logprobs_of(logits, token, params.logprobs)
            top = list(zip(top_ids[0].tolist(), top_values[0].tolist(), strict=True))
            logprobs = [TokenLogprob(token_id, float(chosen[0]), top)]
        seq.output_ids.append(token_id)
        self._generated += 1
        reason: FinishReason | None = None
        is_eos = token_id in self.tokenizer.eos_token_ids and not params.ignore_eos
        if is_eos or token_id in params.stop_token_ids:
            reason = "stop"
            text = ""  # the stop token itself is not part of the text
        else:
            text = seq.detokenizer.push([token_id])
            if seq.detokenizer.stopped:
                reason = "stop"
        if reason is None and (
            len(seq.output_ids) >= params.max_tokens
            or len(seq.prompt_ids) + len(seq.output_ids) >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            text += seq.detokenizer.finish()
            seq.finish_reason = reason
            self._release(seq)
        return self._output(seq, [token_id], text, logprobs)

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._reserved -= seq.reserved_tokens
        seq.cache = None

    @staticmethod
    def _output(
        seq: Sequence,
        token_ids: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None,
        error: str | None = None,
    ) -> GenerationOutput:
        return GenerationOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=token_ids,
            text=text,
            num_prompt_tokens=len(seq.prompt_ids),
            num_completion_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason,
            logprobs=logprobs,
            error=error,
        )
