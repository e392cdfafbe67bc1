"""Closing a grammar-constrained sample within its token budget, whatever gets sampled.

Every constrained sample keeps a *closing plan*: a token path from its grammar matcher's
state to an accepting one, then end-of-sequence unless the grammar stops by itself there. A
greedy walk over the grammar finds it: the bytes the grammar forces first, else the first
allowed single-byte token in an order that closes what is open (a quote inside a JSON string;
'}', ']', ',' and short values outside one). The plan's length c bounds the tokens the sample
still needs to end complete; B is what is left of its budget. The steer keeps c <= B:

- while B > c + CLOSE_MARGIN, a sampled token is kept if the state after it has a plan of at
  most B - 1 tokens; otherwise that row is sampled again among the model's top candidates that
  have one, and the plan's first token, which always has (the rest of the plan);
- once B <= c + CLOSE_MARGIN, sampling is restricted to tokens that shorten the plan (the
  plan's first token always does; end-of-sequence once the grammar accepts).

So by induction a sample whose plan fit its budget at the first token ends with its grammar
complete ('stop'), for any sampled path, temperature or seed. When even the first plan is
longer than the budget, the steer still shortens it every step and the sample ends cut off
('length'); a grammar the walk finds no plan for (within PLAN_CAP tokens) is not steered.
Logprobs stay the model's (masked) ones: only which tokens may be sampled changes.

Reasoning blocks (Grammar.think; think.py): the grammar lets the block run free until
the model writes its end tag, so the steer tracks each sample's block with a BlockScan. Inside
the block a plan starts with the end tag (then the answer's plan), so the model thinks freely
while the budget allows and the block is closed in time for the answer; with no reasoning
budget, or one larger than max_tokens, a sample still ends 'stop' with its answer complete
whenever its first plan fit (the block is simply cut shorter). Once a reasoning budget is
spent, the steer forces the end tag token by token (the grammar cannot: think.py says
why). A text answer (budget only, no response format) is steered only inside the block: the
answer itself runs free to max_tokens or end-of-sequence. The walk's JSON `where` counts only
answer text.

Longer than ~300 lines on purpose: one algorithm (the walk, its cost and the steering that
uses it) whose invariants only read together.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import llguidance
import torch

from hearth.engine.constrained.think import BEFORE, INSIDE, BlockScan
from hearth.engine.sampler import sample
from hearth.engine.types import SamplingParams

CLOSE_MARGIN = 8  # tokens: closing starts this many tokens before the budget forces it
CANDIDATES = 8  # the model's top tokens weighed when a row has to be steered
PLAN_CAP = 1024  # tokens: a sample with no plan this short at its start is not steered

# Where the walk is, as far as JSON text goes: it picks which bytes to try first.
OUTSIDE, IN_STRING, ESCAPED = 0, 1, 2
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_WHITESPACE = b" \t\n\r"
_PRINTABLE = (
    b"123456789"
    + string.ascii_lowercase.encode()
    + string.ascii_uppercase.encode()
    + string.punctuation.encode()
)
_CONTROL = bytes(b for b in range(32) if b not in _WHITESPACE)
_HIGH = bytes(range(127, 256))
# Byte orders, by style and where: JSON tries '"' early outside strings (keys, string values);
# the second style, for grammars where a quote opens one more item each time (a walk in the
# first style never ends there), tries every other byte before '"', '[', '{' and whitespace.
_ORDERS = (
    {
        OUTSIDE: b'}],0"' + _PRINTABLE + _CONTROL + _HIGH + _WHITESPACE,
        IN_STRING: b'"0a' + _PRINTABLE + _WHITESPACE + _HIGH + _CONTROL,
        ESCAPED: b'n\\"' + _PRINTABLE,
    },
    {
        OUTSIDE: b"}],0" + _CONTROL + _PRINTABLE.translate(None, b'"[{') + _HIGH + b'"[{',
        IN_STRING: b'"0a' + _PRINTABLE + _WHITESPACE + _HIGH + _CONTROL,
        ESCAPED: b'n\\"' + _PRINTABLE,
    },
)


RUN_LENGTH = 2  # bytes of one class after which the walk tries other bytes first
_RUNS = ("digit", "letter")
_CLASS = [
    "digit" if chr(b).isdigit() else "letter" if chr(b).isalpha() and b < 128 else None
    for b in range(256)
]


def scan(where: int, data: bytes) -> int:
    """Where text is (OUTSIDE, IN_STRING, ESCAPED) after `data` follows text that was `where`."""
    for byte in data:
        if where == ESCAPED:
            where = IN_STRING
        elif where == IN_STRING:
            if byte == _BACKSLASH:
                where = ESCAPED
            elif byte == _QUOTE:
                where = OUTSIDE
        elif byte == _QUOTE:
            where = IN_STRING
    return where


@dataclass
class ClosingState:
    """One sample's closing plan, for its matcher's current state."""

    matcher: llguidance.LLMatcher
    plan: list[int] | None = None  # tokens to an accepting state; None: none found
    planned: bool = False  # whether `plan` is for the current state
    steered: bool = True  # False once no plan was found at the start: sampled freely
    where: int = OUTSIDE  # scan() of the answer text so far
    style: int = 0  # the byte order that found the last plan, tried first next time
    block: BlockScan | None = None  # where the text is relative to its reasoning block, if any
    free_answer: bool = False  # a text answer (no grammar): steered only inside the block
    # Plans of the tokens weighed this step, for the one sampled: token -> (plan, where, block).
    weighed: dict[int, tuple[list[int] | None, int, BlockScan | None]] = field(default_factory=dict)


class Closer:
    """Finds closing plans for one tokenizer's matchers, and steers sampling with them."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, eos_token_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self.eos = frozenset(eos_token_ids)
        self._end = min(self.eos)  # the end-of-sequence token plans end with
        byte_token = {}
        for byte in range(256):
            tokens = tokenizer.tokenize_bytes(bytes([byte]))
            if len(tokens) == 1:
                byte_token[byte] = tokens[0]
        # [style][where][the class of a run just walked]: that class's bytes go last, so a run
        # of letters or digits that the grammar would let go on forever ends.
        self._orders = [
            {
                where: {
                    run: [
                        byte_token[b]
                        for b in sorted(
                            dict.fromkeys(order),
                            key=lambda b, r=run: r is not None and _CLASS[b] == r,
                        )
                        if b in byte_token
                    ]
                    for run in (None, *_RUNS)
                }
                for where, order in orders.items()
            }
            for orders in _ORDERS
        ]
        self._bytes: dict[int, bytes] = {}
        self._tags: dict[bytes, list[int]] = {}  # a reasoning block's end tag -> its tokens

    def token_bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self._tokenizer.decode_bytes([token])
        return self._bytes[token]

    def step(self, where: int, block: BlockScan | None, token: int) -> tuple[int, BlockScan | None]:
        """`where` and `block` after `token`: only answer text moves `where`."""
        data = self.token_bytes(token)
        if block is not None:
            block, data = block.after(data)
        return scan(where, data), block

    def _close(self, block: BlockScan | None) -> list[int]:
        """The tokens that close the sample's reasoning block if it is in one, else []."""
        if block is None or block.phase != INSIDE:
            return []
        if block.end not in self._tags:
            self._tags[block.end] = self._tokenizer.tokenize_bytes(block.end)
        return self._tags[block.end]

    # -- plans ------------------------------------------------------------------------------
    def walk(
        self,
        state: ClosingState,
        matcher: llguidance.LLMatcher,
        where: int,
        cap: int,
        block: BlockScan | None = None,
    ) -> list[int] | None:
        """A path of at most `cap` tokens from `matcher`, whose text so far is `where` (and
        `block`), to an accepting state, in the sample's last working style first; None if none
        is found. Inside a reasoning block the path closes it first. Advances `matcher`: pass a
        copy."""
        styles = (state.style, 1 - state.style)
        close = self._close(block)
        before = block is not None and block.phase == BEFORE
        base = matcher.deep_copy() if before else None
        for style in styles:
            trial = matcher.deep_copy() if style == styles[0] else matcher
            path: list[int] = []
            if close:  # free text until the tag: close the block, then walk the answer
                closed = trial.deep_copy()
                if closed.try_consume_tokens(close) == len(close):
                    trial, path, where = closed, list(close), OUTSIDE
            rest = self._walk(trial, where, cap - len(path), self._orders[style])
            if rest is not None:
                state.style = style
                return path + rest
        if base is not None and block is not None:  # the walk opened a block it cannot close:
            # open one (the rest of its start tag) and close it at once, then walk the answer
            tag = block.start[len(block.held.lstrip()) :] + block.end
            path = self._tokenizer.tokenize_bytes(tag)
            if base.try_consume_tokens(path) == len(path):
                rest = self._walk(base, OUTSIDE, cap - len(path), self._orders[state.style])
                if rest is not None:
                    return path + rest
        return None

    def _walk(
        self,
        matcher: llguidance.LLMatcher,
        where: int,
        cap: int,
        orders: dict[int, dict[str | None, list[int]]],
    ) -> list[int] | None:
        path: list[int] = []
        run: str | None = None  # the class of the last RUN_LENGTH bytes walked, if one
        while not matcher.is_accepting():
            if len(path) >= cap or matcher.is_stopped() or matcher.is_error():
                return None
            taken: list[int] = []
            forced = matcher.compute_ff_bytes()
            if forced:
                tokens = self._tokenizer.tokenize_bytes(forced)
                taken = tokens[: matcher.try_consume_tokens(tokens)]
            if not taken:
                for token in orders[where][run]:
                    if matcher.try_consume_tokens([token]):
                        taken = [token]
                        break
                else:
                    return None  # no single byte goes on: give up
            path += taken
            tail = b"".join(self.token_bytes(t) for t in path[-RUN_LENGTH:])[-RUN_LENGTH:]
            classes = {_CLASS[b] for b in tail}
            run = classes.pop() if len(tail) == RUN_LENGTH and len(classes) == 1 else None
            for token in taken:
                where = scan(where, self.token_bytes(token))
        if not matcher.is_stopped():  # complete, and ended by end-of-sequence
            path.append(self._end)
        return path if len(path) <= cap else None

    def cost(self, state: ClosingState) -> float:
        """Tokens the sample needs, at most, to complete its grammar and end (inf: no plan)."""
        if not state.steered:
            return float("inf")
        if state.free_answer and (state.block is None or state.block.phase != INSIDE):
            return float("inf")  # free text, not cut short; only the block gets closed
        if not state.planned:
            matcher = state.matcher.deep_copy()
            state.plan = self.walk(state, matcher, state.where, PLAN_CAP, state.block)
            state.planned = True
            state.steered = state.plan is not None
        return float("inf") if state.plan is None else len(state.plan)

    def cost_after(self, state: ClosingState, token: int, bound: int) -> float:
        """Tokens needed after `token`, if at most `bound` (else inf); 0 when `token` ends the
        sample with the grammar complete. Remembers the plan for advance()."""
        if token in self.eos:
            return 0 if state.matcher.is_accepting() else float("inf")
        if token not in state.weighed:
            plan = state.plan
            where, block = self.step(state.where, state.block, token)
            if plan and plan[0] == token:  # the rest of the plan is a plan
                state.weighed[token] = (plan[1:], where, block)
            else:
                matcher = state.matcher.deep_copy()
                plan = None
                if matcher.try_consume_tokens([token]) == 1:
                    plan = self._same_plan(matcher, state.plan or [])
                    if plan is None:
                        plan = self.walk(state, matcher, where, max(bound, 0), block)
                state.weighed[token] = (plan, where, block)
        plan = state.weighed[token][0]
        return float("inf") if plan is None or len(plan) > bound else len(plan)

    @staticmethod
    def _same_plan(matcher: llguidance.LLMatcher, plan: list[int]) -> list[int] | None:
        """`plan` if it still ends the sample from `matcher` (most tokens inside a string leave
        the plan as it was): one call instead of a walk."""
        trial = matcher.deep_copy()
        if plan and trial.try_consume_tokens(plan) == len(plan) and trial.is_stopped():
            return plan
        return None

    def advance(self, state: ClosingState, token: int) -> None:
        """The matcher has consumed `token`: move the plan along."""
        if token in state.weighed and state.weighed[token][0] is not None:
            state.plan, state.where, state.block = state.weighed[token]
            state.planned = True
        else:
            state.where, state.block = self.step(state.where, state.block, token)
            state.planned = False  # planned on demand
        state.weighed.clear()

    # -- sampling ---------------------------------------------------------------------------
    def sample(
        self,
        logits: torch.Tensor,
        rows: Sequence[tuple[int, ClosingState, int]],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """sample() for a batch whose `rows` (row, closing state, budget left) are constrained:
        each such row completes its grammar within its budget. logits: [B, V] masked by the
        grammars; returns [B] token ids."""
        logits, rows = self._force_close(logits, rows)
        planned = [r for r in rows if self.cost(r[1]) != float("inf")]  # others: unsteered
        closing = [r for r in planned if r[2] <= self.cost(r[1]) + CLOSE_MARGIN]
        free = [r for r in planned if r[2] > self.cost(r[1]) + CLOSE_MARGIN]
        scores = logits
        if closing:  # only tokens that shorten the plan
            scores = self._restrict(logits, logits, closing, shorten=True)
        tokens = sample(scores, params, generators)
        if not free:
            return tokens
        ids = tokens.tolist()
        broken = [r for r in free if self.cost_after(r[1], ids[r[0]], r[2] - 1) == float("inf")]
        if not broken:
            return tokens
        # Rare: the sampled token leaves too little budget to close. Sample those rows again
        # among tokens that leave enough.
        scores = self._restrict(scores, logits, broken, shorten=False)
        index = torch.tensor([r[0] for r in broken], device=logits.device)
        again = sample(
            scores.index_select(0, index),
            [params[r[0]] for r in broken],
            [generators[r[0]] for r in broken],
        )
        return tokens.index_copy(0, index, again)

    def _force_close(
        self, logits: torch.Tensor, rows: Sequence[tuple[int, ClosingState, int]]
    ) -> tuple[torch.Tensor, list[tuple[int, ClosingState, int]]]:
        """Rows whose reasoning budget is spent may only write the block's end tag, token by
        token: `logits` with -inf on all else there ([B, V]), and the rows left to steer."""
        forced: list[tuple[int, int]] = []  # (row, token)
        for row, state, _ in rows:
            done = state.block.forcing() if state.block is not None else None
            close = self._close(state.block)
            if done is not None and done < len(close):
                forced.append((row, close[done]))
        if not forced:
            return logits, list(rows)
        logits = logits.clone()
        for row, token in forced:
            score = logits[row, token].clone()  # the grammar allows it: free text until the tag
            logits[row] = float("-inf")
            logits[row, token] = score if score.isfinite() else 0.0
        skip = {row for row, _ in forced}
        return logits, [r for r in rows if r[0] not in skip]

    def _restrict(
        self,
        scores: torch.Tensor,
        logits: torch.Tensor,
        rows: Sequence[tuple[int, ClosingState, int]],
        shorten: bool,
    ) -> torch.Tensor:
        """`scores` with -inf on each row's tokens but the allowed ones among the model's top
        candidates, the plan's first token and end-of-sequence: those that shorten the plan
        (`shorten`), or else those after which the budget still suffices. Every row has a
        plan; its first token is always allowed."""
        index = torch.tensor([r[0] for r in rows], device=logits.device)
        picked = logits.index_select(0, index)  # [R, V]
        top = picked.topk(min(CANDIDATES, picked.shape[-1]), dim=-1).indices.tolist()
        ends = sorted(self.eos)
        ids = [
            list(dict.fromkeys([*candidates, *(state.plan or [])[:1], *ends]))
            for candidates, (_, state, _) in zip(top, rows, strict=True)
        ]
        width = max(map(len, ids))
        padded = torch.tensor([row + row[:1] * (width - len(row)) for row in ids])  # [R, W]
        finite = picked.gather(1, padded.to(logits.device)).isfinite().tolist()  # one copy
        keep = torch.zeros_like(picked, dtype=torch.bool)  # [R, V]
        for i, (_, state, budget) in enumerate(rows):
            bound = int(self.cost(state)) - 1 if shorten else budget - 1
            allowed = [
                t
                for t, ok in zip(ids[i], finite[i], strict=False)
                if ok and self.cost_after(state, t, bound) != float("inf")
            ]
            if allowed:
                keep[i, allowed] = True
            else:  # nothing known to help (cannot happen with a plan): leave the row be
                keep[i] = picked[i].isfinite()
        restricted = scores.index_select(0, index).masked_fill(~keep, float("-inf"))
        return scores.index_copy(0, index, restricted)
