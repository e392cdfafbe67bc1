"""Batched next-token sampling on the logits' device: temperature, top-k, top-p, min-p, seeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from hearth.engine.types import SamplingParams


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
    logits = logits.float()
    biased = [
        (row, token_id, bias)
        for row, p in enumerate(params)
        for token_id, bias in p.logit_bias.items()
        if 0 <= token_id < logits.shape[-1]
    ]
    if biased:  # one scatter for every bias of the batch
        rows, ids, values = zip(*biased, strict=True)
        index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
        logits = logits.index_put(
            index, torch.tensor(values, device=logits.device), accumulate=True
        )
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
