"""The reasoning parser (issue 17): `<think>` blocks split from the answer, any chunking."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hearth.server.reasoning import ReasoningParser, Split, split_text


def chunked(text: str, cuts: list[int], parser: str = "think_tags", opened: bool = False) -> Split:
    reasoning = ReasoningParser(parser, opened)
    out, start = Split(), 0
    for cut in sorted(c % (len(text) + 1) for c in cuts):
        out += reasoning.feed(text[start:cut])
        start = max(start, cut)
    out += reasoning.feed(text[start:])
    return out + reasoning.finish()


@pytest.mark.parametrize(
    ("text", "opened", "reasoning", "content"),
    [
        ("<think>\nLet me see.\n</think>\n\nParis.", False, "\nLet me see.\n", "Paris."),
        ("  <think>a</think>b", False, "a", "b"),
        ("Paris.", False, "", "Paris."),
        ("Paris. <think>not a block</think> ok", False, "", "Paris. <think>not a block</think> ok"),
        ("Let me see.\n</think>\n\nParis.", True, "Let me see.\n", "Paris."),
        ("<think>\nhm</think>Paris", True, "\nhm", "Paris"),  # a repeated <think> is dropped
        ("budget ran out in the middle", True, "budget ran out in the middle", ""),
        ("<think>never closed </thi", False, "never closed </thi", ""),
        ("<think>a</think>b</think>c <think>d", False, "a", "b</think>c <think>d"),
        ("<thinking>is not the tag", False, "", "<thinking>is not the tag"),
        ("<th", False, "", "<th"),
        ("", True, "", ""),
        ("   ", False, "", ""),
    ],
)
def test_splits(text: str, opened: bool, reasoning: str, content: str) -> None:
    assert split_text(text, "think_tags", opened) == Split(reasoning, content)


def test_none_is_all_content() -> None:
    assert split_text("<think>a</think>b", "none", False) == Split("", "<think>a</think>b")
    assert split_text("a</think>b", "none", True) == Split("", "a</think>b")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ReasoningParser("deepthought")


PIECES = ["<think>", "</think>", "<", "</", "think", ">", "\n", " ", "a", "Paris", "<thi", "nk>"]


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from(PIECES), max_size=14).map("".join),
    st.lists(st.integers(0, 200), max_size=8),
    st.booleans(),
)
def test_any_chunking_gives_the_same_split(text: str, cuts: list[int], opened: bool) -> None:
    assert chunked(text, cuts, opened=opened) == split_text(text, "think_tags", opened)


def test_reasoning_tokens_count_the_block_and_its_tags() -> None:
    reasoning = ReasoningParser("think_tags", opened=False)
    tokens = ["<think>", "\n", "hm", "</think>", "\n\n", "Paris", "."]
    for token in tokens:
        reasoning.count(token, 1)
    assert reasoning.reasoning_tokens == 4 and reasoning.done_reasoning
    opened = ReasoningParser("think_tags", opened=True)
    for token in ["a", "b", "</think>", "c"]:
        opened.count(token, 1)
    assert opened.reasoning_tokens == 3
