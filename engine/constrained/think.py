"""Reasoning blocks in constrained decoding: one llguidance grammar for `<think>…</think>` then
the answer, and a byte scan (BlockScan) that tells where a sample is relative to its block and
how much of its reasoning budget it has spent.

The grammar is written in llguidance's Lark dialect (docs/syntax.md in guidance-ai/llguidance:
`%llguidance {}`, the `lazy` lexeme attribute, `&` / `~` on tokens, `@name` references into a
JSON top-level grammar `{"grammars": [...]}` whose first entry is the start):

    %llguidance {}
    thought[lazy]: /(?s:.*)<\\/think>/             (free text up to the first end tag)
    answer: /[ \\t\\r\\n]{0,4}/ @answer              (json_schema, regex, lark: a sub-grammar)
    answer: /(?s:.*)/                            (text: any text)
    start: thought answer                        (opened: the prompt left the block open)
    start: OPEN thought answer | answer          (else; OPEN: /[ \\t\\r\\n]{0,4}<think>/; for a text
                                                  answer, PLAIN: any text not opening a block)

Behaviour (llguidance 1.9.1, checked in tests/engine/test_think_grammar.py):
- reasoning is free text (look-alikes such as `<think>`, `</thin`, `{` included) until the
  first end tag, which ends the lazy lexeme; then the answer's grammar applies, after up to 4
  whitespace characters (`\\n\\n`; bounded, or a model may pad forever; the reasoning parser
  drops them);
- the budget (`ThinkBlock.max_tokens`) is not in the grammar: the closing steer
  (closing.py) forces the end tag, token by token, once BlockScan has counted that many
  tokens inside the block (the model's own tag tokens included; 0: at once). A model caught
  mid-tag (`</` `think` as its last budgeted tokens) gets the full tag after the partial one
  (`…</think</think>`): the block still ends at the first complete tag, as the parser reads it;
- `opened=False`: optional whitespace and the start tag open a block, anything else is the
  answer from its first token (a text answer that opens with the start tag is a block).

Not used, on purpose: `thought[stop="</think>", max_tokens=N]: /(?s:.*)/` followed by the
literal `"</think>"` would force the tag at the budget inside the grammar, and the literal is
satisfied by the stop's own bytes, but llguidance 1.9.1 panics ("num_rows=2 row_infos=1")
computing a mask once a partial stop (`…</think`) is pending, and in try_consume_tokens on the
token that completes it; the panic poisons the matcher, every copy of it and the compile
cache's. `stop=` without the literal does not panic but does not force the tag at the budget,
and neither does `lazy` with `max_tokens` (the lexeme just ends there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from hearth.engine.types import ThinkBlock

_META = set("\\.^$|?*+()[]{}/")
GAP = "[ \\t\\r\\n]{0,4}"  # whitespace between the close and a structured answer
BEFORE, INSIDE, AFTER = 0, 1, 2  # where a sample is: may still open a block, in it, past it


def _regex(text: str) -> str:
    """`text` as a literal inside a Lark /regex/."""
    return "".join("\\" + c if c in _META else c for c in text)


def compose(block: ThinkBlock, answer: str | None) -> str:
    """The llguidance grammar: a reasoning block, then the answer. `answer`: the answer's
    llguidance grammar (Lark text, or a JSON top-level grammar); None: any text. The budget
    (`block.max_tokens`) is not in it: the closing steer forces the end tag (closing.py)."""
    rules = [
        "%llguidance {}",
        f"thought[lazy]: /(?s:.*){_regex(block.end)}/",
        "answer: /(?s:.*)/" if answer is None else f"answer: /{GAP}/ @answer",
    ]
    if block.opened:
        rules.append("start: thought answer")
    else:
        rules.append(f"OPEN: /{GAP}{_regex(block.start)}/")
        if answer is None:  # any text but one that opens a block
            rules.append(f"PLAIN: /(?s:.*)/ & ~/\\s*{_regex(block.start)}(?s:.*)/")
        direct = "PLAIN" if answer is None else "answer"
        rules.append(f"start: OPEN thought answer | {direct}")
    main = "\n".join(rules) + "\n"
    if answer is None:
        return main
    if answer.lstrip().startswith("{"):  # a JSON top-level grammar (JSON schema, regex)
        entries = json.loads(answer)["grammars"]
    else:
        entries = [{"lark_grammar": answer}]
    entries = [{**entries[0], "name": "answer"}, *entries[1:]]
    return json.dumps({"grammars": [{"name": "think", "lark_grammar": main}, *entries]})


@dataclass(frozen=True)
class BlockScan:
    """Where a sample's output is relative to its reasoning block, read from its bytes one
    token at a time (the rules of server/reasoning.py's parser, on bytes), and how much of the
    block's budget is spent."""

    start: bytes
    end: bytes
    phase: int  # BEFORE, INSIDE, AFTER
    budget: int | None = None  # tokens inside the block before its end tag is forced
    spent: int = 0  # tokens inside the block so far (the model's own tag tokens included)
    held: bytes = b""  # BEFORE: the output so far; INSIDE: its tail that may begin the end tag

    @classmethod
    def of(cls, block: ThinkBlock | None) -> BlockScan | None:
        if block is None:
            return None
        phase = INSIDE if block.opened else BEFORE
        return cls(block.start.encode(), block.end.encode(), phase, block.max_tokens)

    def after(self, data: bytes) -> tuple[BlockScan, bytes]:
        """The scan after one more token's bytes, and the part of them that is answer text."""
        if self.phase == AFTER:
            return self, data
        if self.phase == INSIDE:
            return self._inside(self.held + data, self.spent + 1)
        text = self.held + data
        lead = text.lstrip()
        if lead.startswith(self.start):  # opened: the rest of the token is inside
            return self._inside(lead[len(self.start) :], 0)
        if self.start.startswith(lead):  # may still open a block
            return replace(self, held=text), b""
        return replace(self, phase=AFTER, held=b""), text  # no block: all answer

    def _inside(self, text: bytes, spent: int) -> tuple[BlockScan, bytes]:
        at = text.find(self.end)
        if at >= 0:
            return replace(self, phase=AFTER, spent=spent, held=b""), text[at + len(self.end) :]
        keep = text[-(len(self.end) - 1) :] if len(self.end) > 1 else b""
        return replace(self, phase=INSIDE, spent=spent, held=keep), b""

    def forcing(self) -> int | None:
        """How many tokens of the end tag are already forced, once the budget is spent (the
        next forced token is the tag's token at that index); None while the model is free."""
        if self.phase != INSIDE or self.budget is None or self.spent < self.budget:
            return None
        return self.spent - self.budget
