"""A sequence: one sample of a request, its tokens, KV blocks and progress (torch-free)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hearth.engine.types import FinishReason, MultiModalInputs, SamplingParams

_arrivals = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of those, tokens taken from the prefix cache at admission
    block_hashes: list[int] = field(default_factory=list)  # chained keys of full computed blocks
    finish_reason: FinishReason | None = None
    arrival: int = field(default_factory=lambda: next(_arrivals))
    enqueued_at: float | None = None  # the scheduler's clock when first queued (priority aging)
    last_turn: int = 0  # when the scheduler last ran it (lower priorities take turns)
    # engine-side state the scheduler never looks at (detokenizer, torch generator)
    state: Any = None
    mm: MultiModalInputs | None = None  # the prompt's images (vision models); None: text
    # speculative decoding: draft tokens proposed after the last token, verified this step
    # (the scheduler gives them lookahead slots; engine/spec_decode/)
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def priority(self) -> int:
        return self.params.priority

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens(self, start: int, stop: int) -> list[int]:
        """token_ids()[start:stop] without building the whole list (a decode needs one token)."""
        split = len(self.prompt_ids)
        if start >= split:
            return self.output_ids[start - split : stop - split]
        if stop <= split:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[: stop - split]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
