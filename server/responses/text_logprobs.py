"""Responses' `include: ["message.output_text.logprobs"]`: each output_text part's logprobs.

Entries are placed in the generated text by server.logprobs.LogprobAligner (so a stop string's
tokens are never listed), then only the answer's are kept: tokens of the thinking (a reasoning
model's) come before the answer's first character and are left out. Text the tool-call parser
turns into a call takes its entries with it (`drop`); what becomes message text takes the
entries queued so far (`take`). Each entry has chat's shape: token, logprob, bytes,
top_logprobs (OpenAI's Responses logprob object).
"""

from __future__ import annotations

from typing import Any

from hearth.engine.types import EngineClient, FinishReason, TokenLogprob
from hearth.server.logprobs import Aligned, LogprobAligner, chat_logprobs


class TextLogprobs:
    """One response's logprobs, fed as its outputs arrive."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.aligner = LogprobAligner(engine)
        self.fed = 0  # characters of generated text so far
        self.answer_from: int | None = None  # where the answer starts (after any thinking)
        self.queued: list[Aligned] = []

    def feed(
        self,
        text: str,
        answer: str,
        entries: list[TokenLogprob] | None,
        finish: FinishReason | None,
    ) -> None:
        """`text` generated (`answer`: its part after the thinking) with its `entries`."""
        self.fed += len(text)
        if self.answer_from is None and answer:
            self.answer_from = self.fed - len(answer)
        placed = self.aligner.feed(text, entries, finish)
        if self.answer_from is not None:
            self.queued += [a for a in placed if a.offset >= self.answer_from]

    def take(self) -> list[dict[str, Any]]:
        """The entries of the message text just emitted, in the wire's shape."""
        taken, self.queued = self.queued, []
        return chat_logprobs(self.engine, taken)["content"] if taken else []

    def drop(self) -> None:
        """The text queued became a tool call: its entries are not a message's."""
        self.queued = []
