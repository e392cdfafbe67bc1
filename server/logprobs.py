"""Log-probabilities in OpenAI's two shapes: chat (`content[]`) and completions (parallel lists).

Token strings, `bytes` and text offsets come from each token's raw bytes (EngineClient.
token_pieces), never from decoding a token alone: a token that is not valid UTF-8 by itself is
shown as OpenAI shows it, `bytes:\\xe2\\x80`, with `bytes` its raw bytes; special tokens carry
their text (`<|im_end|>`). So concatenating the `bytes` of a choice's tokens gives the UTF-8 of
its text.

Logprobs cover exactly the returned text (LogprobAligner): the tokens of a stop string are not
listed, and neither is the stop token that ended a sequence in chat (as OpenAI). Legacy
completions list that stop token last, by its text (`<|im_end|>`), which `text` leaves out, as
vLLM does: lm-evaluation-harness scores an echoed prompt by dropping the last entry as the one
generated token, so an unlisted stop token would cost the prompt's last token its score.

Prompt logprobs (the engine's GenerationOutput.prompt_logprobs, None for the first token) come in
two shapes: prepended to a completions choice's logprobs when it echoes the prompt
(`prompt_aligned`), and vLLM's `prompt_logprobs` list (`vllm_prompt_logprobs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hearth.engine.types import EngineClient, FinishReason, TokenLogprob

FLOOR = -9999.0  # OpenAI's stand-in for log(0); JSON has no -Infinity


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else FLOOR


def token_string(raw: bytes, special: bool = False) -> str:
    """How a token is shown: its text, or `bytes:\\xNN...` when it is not valid UTF-8 alone."""
    if special:
        return raw.decode(errors="replace")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@dataclass
class Aligned:
    """A sampled token's logprob entry, placed in the choice's text."""

    entry: TokenLogprob | None  # None: the prompt's first token (nothing precedes it)
    raw: bytes
    special: bool
    offset: int  # whole characters of the choice text before this token's first byte


class LogprobAligner:
    """Per choice: releases logprob entries once the text they produced has been returned.

    Feed each output's text delta, logprob entries and finish reason; get back the entries whose
    first byte lies within the text returned so far. When a sequence ends with "stop", the
    entries still held (a stop string's tokens, the stop token) are dropped; any other ending
    releases them. Special tokens are zero-width in the text. `keep_stop_token`: a special token
    that ended the sequence is released last instead of dropped (legacy completions).
    """

    def __init__(
        self, engine: EngineClient, offset: int = 0, keep_stop_token: bool = False
    ) -> None:
        self.engine = engine
        self.keep_stop_token = keep_stop_token
        self.text_bytes = 0  # bytes of text returned so far
        self.token_bytes = 0  # bytes of the released tokens
        self.chars = offset  # whole characters in the released tokens (plus the offset)
        self.partial = 0  # continuation bytes still owed by the last character begun
        self.held: list[TokenLogprob] = []

    def feed(
        self, text: str, entries: list[TokenLogprob] | None, finish: FinishReason | None = None
    ) -> list[Aligned]:
        self.text_bytes += len(text.encode())
        self.held += entries or []
        released: list[Aligned] = []
        while self.held and (self.token_bytes < self.text_bytes or finish not in (None, "stop")):
            released.append(self._place(self.held.pop(0)))
        if finish == "stop" and self.keep_stop_token and self.held:
            [(_, special)] = self.engine.token_pieces([self.held[-1].token_id])
            if special:  # the stop token, not the tail of a stop string
                released.append(self._place(self.held[-1]))
        if finish is not None:
            self.held.clear()
        return released

    def _place(self, entry: TokenLogprob) -> Aligned:
        return self.place(entry.token_id, entry)

    def place(self, token_id: int, entry: TokenLogprob | None) -> Aligned:
        """Release one token now, at the current offset (prompt tokens, which are all text)."""
        [(raw, special)] = self.engine.token_pieces([token_id])
        aligned = Aligned(entry, raw, special, self.chars)
        if not special:
            self.token_bytes += len(raw)
            for byte in raw:  # count characters as they complete
                if byte & 0xC0 == 0x80:
                    self.partial = max(0, self.partial - 1)
                else:
                    self.partial = (
                        3 if byte >= 0xF0 else 2 if byte >= 0xE0 else 1 if byte >= 0xC0 else 0
                    )
                if self.partial == 0:
                    self.chars += 1
        return aligned


def aligned(
    engine: EngineClient,
    text: str,
    entries: list[TokenLogprob],
    finish: FinishReason | None,
    offset: int = 0,
    keep_stop_token: bool = False,
) -> list[Aligned]:
    """A whole choice's entries, aligned with its text (see LogprobAligner)."""
    return LogprobAligner(engine, offset, keep_stop_token).feed(text, entries, finish)


def prompt_aligned(
    engine: EngineClient,
    prompt_ids: list[int],
    scores: list[TokenLogprob | None] | None,
    k: int,
) -> list[Aligned]:
    """The echoed prompt's tokens placed in its text from offset 0, with their logprob entries
    (top alternatives cut to k; the first token's entry is None). scores None: the engine
    computed none (a request that failed first); every entry is None then."""
    aligner = LogprobAligner(engine)
    placed = []
    for pos, token_id in enumerate(prompt_ids):
        entry = scores[pos] if scores else None
        if entry is not None:
            entry = TokenLogprob(entry.token_id, entry.logprob, entry.top[:k], entry.rank)
        placed.append(aligner.place(token_id, entry))
    return placed


def vllm_prompt_logprobs(
    engine: EngineClient, scores: list[TokenLogprob | None] | None, k: int
) -> list[dict[str, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs`: None first, then per prompt token {token id as a string:
    {"logprob", "rank", "decoded_token"}} for the token itself and its top k alternatives."""
    if scores is None:
        return None
    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in scores:
        if entry is None:
            out.append(None)
            continue
        ranked = [(entry.token_id, entry.logprob, entry.rank)]
        ranked += [(t, lp, r) for r, (t, lp) in enumerate(entry.top[:k], start=1)]
        pieces = engine.token_pieces([t for t, _, _ in ranked])
        position: dict[str, dict[str, Any]] = {}
        for (token_id, logprob, rank), (raw, special) in zip(ranked, pieces, strict=True):
            position.setdefault(
                str(token_id),
                {
                    "logprob": _value(logprob),
                    "rank": rank,
                    "decoded_token": token_string(raw, special),
                },
            )
        out.append(position)
    return out


def _tops(engine: EngineClient, entry: TokenLogprob | None) -> list[tuple[str, bytes, float]]:
    if entry is None:
        return []
    pieces = engine.token_pieces([t for t, _ in entry.top])
    return [
        (token_string(raw, special), raw, _value(lp))
        for (raw, special), (_, lp) in zip(pieces, entry.top, strict=True)
    ]


def chat_logprobs(engine: EngineClient, entries: list[Aligned]) -> dict[str, Any]:
    def item(token: str, raw: bytes, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(raw)}

    content = [
        {
            **item(token_string(a.raw, a.special), a.raw, _value(a.entry.logprob)),
            "top_logprobs": [item(*top) for top in _tops(engine, a.entry)],
        }
        for a in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(engine: EngineClient, entries: list[Aligned]) -> dict[str, Any]:
    return {
        "tokens": [token_string(a.raw, a.special) for a in entries],
        "token_logprobs": [None if a.entry is None else _value(a.entry.logprob) for a in entries],
        "top_logprobs": [
            None if a.entry is None else {t: lp for t, _, lp in _tops(engine, a.entry)}
            for a in entries
        ],
        "text_offset": [a.offset for a in entries],
    }
