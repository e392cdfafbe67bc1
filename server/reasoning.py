"""Reasoning ("thinking") split from the answer, incrementally: `<think>…</think>` blocks.

Families (`reasoning_parser` in models.yaml; ModelInfo.reasoning_parser):
- `think_tags`: DeepSeek-R1 and its Llama/Qwen distills, Qwen3, QwQ and their fine-tunes. The
  block is opened either by the model (its output starts with `<think>`, after optional
  whitespace) or by the chat template at the end of the prompt (R1-distill templates end the
  generation prompt with `<think>\\n`; Qwen3 with `enable_thinking: false` renders an empty,
  closed block there instead). `opened=True` says the prompt left a block open.
- `none`: everything is content.

Rules (the same as vLLM's and SGLang's parsers for these families):
- Reasoning is the text inside the first block; content is everything after its `</think>`,
  with the whitespace right after the close dropped. A model that does not open a block at the
  start of its output writes content only: a later `<think>` is content (a look-alike in the
  answer), and so is any `</think>` in content.
- A block that never closes (the budget ran out) is all reasoning, and the answer is empty.
- The tags themselves are in neither part.

Any chunking of the same text gives the same split (tests/unit/test_reasoning_parser.py): text that
may be the start of a tag is held until the next chunk decides it.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hearth.engine.types import EngineClient, Grammar, ThinkBlock

START, END = "<think>", "</think>"
PARSERS = ("none", "think_tags")

# where the parser is: before any output (the model may open a block), inside the block,
# after it (or never in one): content
_PENDING, _REASONING, _CONTENT = 0, 1, 2


@dataclass
class Split:
    """A piece of output, split: either part may be empty."""

    reasoning: str = ""
    content: str = ""

    def __add__(self, other: Split) -> Split:
        return Split(self.reasoning + other.reasoning, self.content + other.content)


class ReasoningParser:
    """Splits one sample's output text into reasoning and content as it streams.

    `feed(text)` returns what can be told apart so far; `finish()` returns the rest; `count`
    also counts reasoning tokens. A block the template opened may still begin with the model's
    own `<think>` (some R1 distills write it again): that tag is dropped too.
    """

    def __init__(self, parser: str = "think_tags", opened: bool = False) -> None:
        if parser not in PARSERS:
            raise ValueError(f"unknown reasoning parser {parser!r}; one of {PARSERS}")
        self.enabled = parser != "none"
        self._state = _REASONING if opened and self.enabled else _PENDING
        if not self.enabled:
            self._state = _CONTENT
        self._held = ""  # text that may still be (part of) a tag or leading whitespace
        self._strip = False  # drop whitespace right after the closing tag
        self._fresh = self._state == _REASONING  # opened by the prompt, nothing seen yet
        self.reasoning_tokens = 0
        self._undecided = 0  # tokens fed while it was unknown whether a block opens

    @property
    def done_reasoning(self) -> bool:
        """The block has closed (or there was none): what comes now is the answer."""
        return self._state == _CONTENT

    def count(self, text: str, num_tokens: int) -> Split:
        """`feed`, counting `num_tokens` as reasoning tokens when `text` is part of the block
        (the tokens of its tags included: tokens held before the block is known to open count
        once it does)."""
        before = self._state
        split = self.feed(text)
        if self._state == _PENDING:  # undecided yet
            self._undecided += num_tokens
            return split
        if _REASONING in (before, self._state) or split.reasoning:
            self.reasoning_tokens += num_tokens + (self._undecided if before == _PENDING else 0)
        self._undecided = 0
        return split

    def feed(self, text: str) -> Split:
        out = Split()
        text = self._held + text
        self._held = ""
        while text:
            if self._state == _CONTENT:
                if self._strip:
                    stripped = text.lstrip()
                    if not stripped:
                        return out  # still only whitespace after the close
                    text, self._strip = stripped, False
                out.content += text
                return out
            if self._state == _PENDING:
                head = text.lstrip()
                if not head or (START.startswith(head) and head != START):
                    self._held = text  # whitespace, or a possible start of `<think>`
                    return out
                if head.startswith(START):
                    self._state, text = _REASONING, head[len(START) :]
                    continue
                self._state = _CONTENT  # no block: all of it is content
                continue
            if self._fresh:  # opened by the prompt: a repeated `<think>` is not reasoning
                head = text.lstrip()
                if not head or (START.startswith(head) and head != START):
                    self._held = text
                    return out
                self._fresh = False
                if head.startswith(START):
                    text = head[len(START) :]
                    continue
            # in the block: up to the closing tag, holding a possible partial tag at the end
            at = text.find(END)
            if at >= 0:
                out.reasoning += text[:at]
                self._state, self._strip, text = _CONTENT, True, text[at + len(END) :]
                continue
            keep = _partial_suffix(text, END)
            out.reasoning += text[: len(text) - keep]
            self._held = text[len(text) - keep :]
            return out
        return out

    def finish(self) -> Split:
        """The text still held: a block never closed is all reasoning (its partial tag too)."""
        held, self._held = self._held, ""
        if self._state == _REASONING:
            return Split(reasoning=held)
        if self._state == _PENDING:
            self._state = _CONTENT
            return Split(content=held) if held.strip() else Split()
        return Split()


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def split_text(text: str, parser: str, opened: bool) -> Split:
    """A whole output, split (the non-streamed routes)."""
    reasoning = ReasoningParser(parser, opened)
    return reasoning.feed(text) + reasoning.finish()


def count_reasoning_tokens(
    engine: EngineClient, token_ids: Sequence[int], parser: str, opened: bool
) -> int:
    """How many of a sample's tokens are thinking (tags included), from each token's text."""
    if parser == "none" or not token_ids:
        return 0
    reasoning = ReasoningParser(parser, opened)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for raw, _ in engine.token_pieces(list(token_ids)):
        reasoning.count(decoder.decode(raw), 1)
    return reasoning.reasoning_tokens


def prompt_block(engine: EngineClient, prompt_ids: Sequence[int]) -> str | None:
    """Where the rendered prompt leaves the reasoning block: "open" when it ends inside one
    (R1-distill templates open it in the generation prompt), "closed" when it ends right after
    one (Qwen3 with `enable_thinking: false` renders an empty, closed block there: the model is
    not to think), else None (the model may open one)."""
    if engine.info.reasoning_parser == "none":
        return None
    pieces = engine.token_pieces(list(prompt_ids[-16:]))
    tail = b"".join(raw for raw, _ in pieces).decode(errors="replace")
    if tail.rfind(START) > tail.rfind(END):
        return "open"
    return "closed" if tail.rstrip().endswith(END) else None


# -- request controls ----------------------------------------------------------------------------

# reasoning_effort -> the reasoning budget in tokens when the request sets none itself
# (None: unbounded; "none"/"minimal" turn thinking off where the template can, else close at once)
EFFORT_BUDGETS: dict[str, int | None] = {
    "none": 0,
    "minimal": 0,
    "low": 1024,
    "medium": 4096,
    "high": None,
}


def template_kwargs(effort: str | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """What the chat template is rendered with besides messages and tools: the request's
    `chat_template_kwargs` (e.g. Qwen3's `enable_thinking`), and `reasoning_effort` for
    templates that read it (with `enable_thinking: false` for none/minimal unless set)."""
    kwargs: dict[str, Any] = {}
    if effort is not None:
        kwargs["reasoning_effort"] = effort
        if EFFORT_BUDGETS[effort] == 0:
            kwargs["enable_thinking"] = False
    kwargs.update(extra or {})
    return kwargs


def reasoning_budget(effort: str | None, max_reasoning_tokens: int | None) -> int | None:
    """The reasoning token budget: `max_reasoning_tokens` when set, else the effort's."""
    if max_reasoning_tokens is not None:
        return max_reasoning_tokens
    return EFFORT_BUDGETS[effort] if effort is not None else None


def think_grammar(
    grammar: Grammar | None, parser: str, opened: bool, budget: int | None
) -> Grammar | None:
    """The sample's grammar with a reasoning block before it (engine/constrained/grammar.py
    composes it): the answer's grammar starts after the block closes, and a budget forces the
    close. Without a reasoning parser, or with neither a grammar nor a budget, nothing changes."""
    if parser == "none" or (grammar is None and budget is None):
        return grammar
    block = ThinkBlock(opened=opened, max_tokens=budget)
    if grammar is None:
        return Grammar("text", "", "max_reasoning_tokens", think=block)
    return dataclasses.replace(grammar, think=block)
