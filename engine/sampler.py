"""Logits processing, all of it: one Sampler call per step turns the model's logits into tokens.

`Sampler.__call__` runs, in this order, on the logits' device (each step a no-op for a batch
that does not use it):

1. penalties: OpenAI presence/frequency (generated tokens), repetition (prompt and generated);
2. min_tokens: end-of-sequence and the request's stop_token_ids get -inf until it is reached;
3. grammar mask: -inf on every token a constrained row's grammar forbids next;
   the logprobs reported are of these logits (the model's, penalised and masked);
4. logit_bias: added to the token's logit;
5. greedy rows (temperature 0, top_k 1, top_p 0) take the argmax here;
6. temperature, then top-k, top-p and min-p masks;
7. draws: one exponential race per row, seeded rows from their own generator, so a seeded
   request gets the same tokens whatever else is in the batch; a constrained row is steered
   to close its grammar within its budget (engine/constrained/closing.py), drawing again when
   it must;
8. logprobs of the chosen token and the top alternatives (from the logits of step 3);
9. one device-to-host copy of the tokens and their logprobs.

Steps 4-7 are `sample()`, which the closing steer also calls on its restricted logits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hearth.engine.types import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from hearth.engine.constrained.closing import ClosingState
    from hearth.engine.constrained.grammar import GrammarCompiler


@dataclass
class SamplingRow:
    """What the Sampler needs of one sequence that samples this step."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None  # seeded requests
    matcher: Any = None  # llguidance matcher when the request has a grammar
    closing: ClosingState | None = None  # that grammar's closing plan (with a matcher)
    budget: int = 0  # tokens the sample may still generate (read with a matcher)


@dataclass
class SamplerOutput:
    """The step's results on the host, one entry per row."""

    token_ids: list[int]
    logprobs: list[list[TokenLogprob] | None]  # None where the request asked for none


class Sampler:
    """Owns every logits-processing step, in the order the module docstring lists."""

    def __init__(self, stop_token_ids: Iterable[int], grammars: GrammarCompiler | None) -> None:
        self.stop_token_ids = frozenset(stop_token_ids)  # end-of-sequence, for min_tokens
        self.grammars = grammars  # masks and closing steer; needed only for constrained rows

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits: [B, V] for B rows; returns each row's token and logprobs on the host."""
        logits = self.processed(logits, rows)
        tokens = self._draw(logits, rows)
        return self._to_host(logits, tokens, rows)

    def processed(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Steps 1-3 (penalties, min_tokens, grammar mask): the logits the logprobs are of.
        logits: [B, V]; returns [B, V]."""
        params = [r.params for r in rows]
        logits = apply_penalties(
            logits, params, [r.prompt_ids for r in rows], [r.output_ids for r in rows]
        )
        logits = self._min_tokens(logits, rows)
        return self._grammar_mask(logits, rows)

    def _min_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """-inf on the stop tokens of rows that have not generated min_tokens yet."""
        blocked = [
            (row, list(self.stop_token_ids | set(r.params.stop_token_ids)))
            for row, r in enumerate(rows)
            if len(r.output_ids) < r.params.min_tokens
        ]
        if blocked:
            logits = logits.float().clone()
            for row, ids in blocked:
                logits[row, ids] = float("-inf")
        return logits

    def _grammar_mask(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        constrained = [(row, r.matcher) for row, r in enumerate(rows) if r.matcher is not None]
        if not constrained:
            return logits
        assert self.grammars is not None, "a constrained row needs the grammar compiler"
        return self.grammars.mask(logits.float(), constrained)

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """[B] token ids on the device; constrained rows are steered to close in time."""
        params = [r.params for r in rows]
        generators = [r.generator for r in rows]
        budgets = [
            (row, r.closing, r.budget) for row, r in enumerate(rows) if r.matcher is not None
        ]
        if not budgets:
            return sample(logits, params, generators)
        assert self.grammars is not None
        return self.grammars.closer.sample(logits, budgets, params, generators)

    @staticmethod
    def _to_host(
        logits: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]
    ) -> SamplerOutput:
        """The tokens, and the logprobs asked for, in one device-to-host copy."""
        asked = [r.params.logprobs for r in rows if r.params.logprobs is not None]
        if not asked:
            token_ids = tokens.tolist()
            return SamplerOutput(token_ids, [None] * len(token_ids))
        k = max(asked)
        chosen, values, ids = logprobs_of(logits, tokens, k)
        packed = torch.cat(
            [tokens[:, None].double(), chosen[:, None].double(), values.double(), ids.double()],
            dim=1,
        ).tolist()  # [B, 2 + 2k]
        token_ids = [int(row[0]) for row in packed]
        logprobs: list[list[TokenLogprob] | None] = []
        for r, token_id, row in zip(rows, token_ids, packed, strict=True):
            if r.params.logprobs is None:
                logprobs.append(None)
                continue
            n = r.params.logprobs
            alts = list(zip([int(i) for i in row[2 + k : 2 + k + n]], row[2 : 2 + n], strict=True))
            logprobs.append([TokenLogprob(token_id, row[1], alts)])
        return SamplerOutput(token_ids, logprobs)


def _filter(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Scale by temperature and mask tokens outside top-k / top-p / min-p with -inf.

    logits: [B, V] float32. Returns [B, V].
    """
    device = logits.device
    temps = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    logits = logits / temps[:, None]  # [B, V]
    vocab = logits.shape[-1]
    # Which filters run is decided from the parameters on the host: no device sync.
    k_values = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_k = torch.tensor(k_values, device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if any(k < vocab for k in k_values) or any(p.top_p < 1 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        ranks = torch.arange(vocab, device=device)[None, :]  # [1, V]
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
        drop = (ranks >= top_k[:, None]) | (before >= top_p[:, None])
        drop[:, 0] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    if any(p.min_p > 0 for p in params):
        probs = logits.softmax(dim=-1)
        floor = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Pick one token per row. logits: [B, V]; returns [B] int64 on the same device.

    Rows with a generator draw their noise from it, so a seeded request gets the same tokens
    whatever else is in the batch.
    """
    logits = apply_bias(logits, params)
    greedy_rows = [p.greedy for p in params]
    chosen = logits.argmax(dim=-1)  # [B]
    if all(greedy_rows):
        return chosen
    probs = _filter(logits, params).softmax(dim=-1)  # [B, V]
    # Exponential race: argmax(p / E) with E ~ Exp(1) samples from p, one noise row per request.
    noise = torch.empty_like(probs).exponential_()  # one draw for every unseeded row
    for row, generator in enumerate(generators):
        if generator is not None:  # seeded rows redraw from their own generator
            noise[row].exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)  # [B]
    greedy = torch.tensor(greedy_rows, device=logits.device)
    return torch.where(greedy, chosen, sampled)


def apply_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logit_bias added (one scatter for the batch). logits: [B, V]; returns [B, V] float32."""
    logits = logits.float()
    biased = [
        (row, token_id, bias)
        for row, p in enumerate(params)
        for token_id, bias in p.logit_bias.items()
        if 0 <= token_id < logits.shape[-1]
    ]
    if biased:
        rows, ids, values = zip(*biased, strict=True)
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits = logits.index_put(
            index, torch.tensor(values, device=logits.device), accumulate=True
        )
    return logits


def probabilities(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """The distribution `sample` draws from: bias, temperature, top-k/top-p/min-p, softmax.
    logits: [B, V]; returns [B, V] float32 (speculative decoding's target and draft p, q)."""
    return _filter(apply_bias(logits, params), params).softmax(dim=-1)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """Log-probabilities of the chosen tokens and the top-k alternatives.

    logits: [B, V]; tokens: [B]. Returns (chosen [B], top values [B, k], top ids [B, k]).
    """
    logp = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    top_values, top_ids = logp.topk(k, dim=-1) if k > 0 else (logp[:, :0], tokens[:, None][:, :0])
    return chosen, top_values, top_ids


def apply_penalties(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """OpenAI presence/frequency penalties (generated tokens) and the multiplicative
    repetition penalty (prompt and generated tokens). logits: [B, V]; returns [B, V]."""
    if all(
        p.presence_penalty == 0 and p.frequency_penalty == 0 and p.repetition_penalty == 1
        for p in params
    ):
        return logits
    device, (rows, vocab) = logits.device, logits.shape
    logits = logits.float().clone()
    counts = torch.zeros(rows, vocab, device=device)  # [B, V] times each token was generated
    seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)  # in prompt or output
    for row, (prompt, output) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        if output:
            ids = torch.tensor(output, device=device)
            counts[row].index_add_(0, ids, torch.ones(len(output), device=device))
        seen[row, torch.tensor(list(prompt) + list(output), dtype=torch.long, device=device)] = True
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    logits -= frequency * counts + presence * (counts > 0)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    return torch.where(seen, penalised, logits)


def prompt_logprobs_of(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """The raw model's log-probabilities of prompt tokens, each with its rank and top k.

    logits: [P, V], row i the model's logits at a prompt position; targets: the P tokens that
    follow those positions. log_softmax in float32, no penalties or bias (vLLM's prompt
    logprobs). Returns one TokenLogprob per row, on the host (one device-to-host copy).
    """
    logp = logits.float().log_softmax(dim=-1)  # [P, V]
    ids = torch.tensor(targets, dtype=torch.long, device=logits.device)
    chosen = logp.gather(-1, ids[:, None])  # [P, 1]
    rank = (logp > chosen).sum(dim=-1, keepdim=True) + 1  # [P, 1]
    values, top_ids = logp.topk(k, dim=-1)  # [P, k]
    packed = torch.cat([chosen.double(), rank.double(), values.double(), top_ids.double()], dim=1)
    return [
        TokenLogprob(
            token_id,
            row[0],
            list(zip([int(i) for i in row[2 + k :]], row[2 : 2 + k], strict=True)),
            int(row[1]),
        )
        for token_id, row in zip(targets, packed.tolist(), strict=True)
    ]
