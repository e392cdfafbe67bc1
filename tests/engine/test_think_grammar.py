"""Reasoning blocks under constrained decoding (Grammar.think): free `<think>` text, a budget
that forces `</think>`, then the answer's grammar; and the closing steer through the block.

llguidance-level tests drive a compiled matcher with the token ids of given texts (SmolLM2's
tokenizer); engine-level tests run a tiny random model greedily or seeded.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import llguidance
import pytest
import torch
from transformers import AutoTokenizer

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.constrained.closing import ClosingState
from hearth.engine.constrained.grammar import GrammarCompiler, GrammarError
from hearth.engine.constrained.think import AFTER, BEFORE, INSIDE, BlockScan
from hearth.engine.types import GenerationRequest, Grammar, SamplingParams, ThinkBlock
from tests.engine.test_closing import STYLES, generate
from tests.engine.test_engine import start_engine

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["a", "ok"],
    "additionalProperties": False,
}
JSON = json.dumps(SCHEMA)
THOUGHT = 'Hmm, {"a": <think> nested?\n\n</thin no; 2 < 3 > 1'  # look-alikes, no end tag


@pytest.fixture(scope="module")
def hf(smollm_tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(hf: Any) -> GrammarCompiler:
    return GrammarCompiler(hf, len(hf), [hf.eos_token_id])


def ids(hf: Any, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def feed(hf: Any, matcher: llguidance.LLMatcher, *texts: str) -> bool:
    """Whether the matcher accepts the tokens of `texts` (each tokenized on its own), with a
    mask computed before each as the engine does (llguidance panics show there)."""
    width = (len(hf) + 31) // 32
    bitmask = torch.zeros(width, dtype=torch.int32)
    for token in [t for text in texts for t in ids(hf, text)]:
        matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), width * 4)
        assert not matcher.is_error(), matcher.get_error()
        if not matcher.consume_token(token):
            return False
    return True


def allowed(compiler: GrammarCompiler, matcher: llguidance.LLMatcher) -> set[int]:
    logits = torch.zeros(1, compiler.vocab_size)  # [1, V]
    return set(compiler.mask(logits, [(0, matcher)])[0].isfinite().nonzero()[:, 0].tolist())


def json_grammar(opened: bool = True, budget: int | None = None) -> Grammar:
    return Grammar("json_schema", JSON, think=ThinkBlock(opened, budget))


def test_free_thinking_then_json_then_only_eos(compiler: GrammarCompiler, hf: Any) -> None:
    matcher = compiler.matcher(json_grammar())
    assert feed(hf, matcher, THOUGHT)
    assert feed(hf, matcher, "</think>")
    first = {compiler.tokenizer.decode_bytes([t])[:1] for t in allowed(compiler, matcher)}
    assert b"{" in first and b"<" not in first  # the answer's grammar applies now
    assert feed(hf, matcher, "\n\n", '{"a": 1, "ok": true}')
    assert matcher.is_accepting() and allowed(compiler, matcher) == {hf.eos_token_id}


@pytest.mark.parametrize(
    "answer",
    ['{"b": 1}', '{"a": "1", "ok": true}', "</think>", "plain text", '{"a": 1, "ok": true}x'],
)
def test_invalid_answers_are_refused(compiler: GrammarCompiler, hf: Any, answer: str) -> None:
    matcher = compiler.matcher(json_grammar())
    assert feed(hf, matcher, "ok</think>\n")
    assert not feed(hf, matcher, answer)


def steer(
    compiler: GrammarCompiler, grammar: Grammar, prefix: str, steps: int, seed: int = 0
) -> tuple[llguidance.LLMatcher, bytes]:
    """The matcher after `prefix` and `steps` tokens drawn as the engine draws them (grammar
    mask, then the closing steer with an ample budget) from random logits; and those tokens'
    bytes."""
    matcher = compiler.matcher(grammar)
    state = ClosingState(matcher, block=BlockScan.of(grammar.think))
    closer = compiler.closer
    tokens = ids(compiler._hf, prefix)
    generator = torch.Generator().manual_seed(seed)
    drawn: list[int] = []
    for i in range(len(tokens) + steps):
        if i < len(tokens):
            token = tokens[i]
        else:
            logits = compiler.mask(
                torch.randn(1, compiler.vocab_size, generator=generator), [(0, matcher)]
            )
            token = int(
                closer.sample(logits, [(0, state, 10_000)], [SamplingParams()], [generator])[0]
            )
            drawn.append(token)
        assert matcher.consume_token(token), matcher.get_error()
        closer.advance(state, token)
    return matcher, compiler.tokenizer.decode_bytes(drawn)


@pytest.mark.parametrize("budget", [0, 1, 4, 6])
def test_the_budget_forces_the_close(compiler: GrammarCompiler, hf: Any, budget: int) -> None:
    thought = "one two three four five six seven eight"
    prefix = hf.decode(ids(hf, thought)[:budget])
    matcher, drawn = steer(compiler, json_grammar(budget=budget), prefix, 3)
    assert drawn == b"</think>"
    assert feed(hf, matcher, '{"a": 2, "ok": false}') and matcher.is_accepting()


def test_an_early_close_within_the_budget(compiler: GrammarCompiler, hf: Any) -> None:
    # the model's own end tag counts in the budget: "ok</think>" is 4 tokens of 6
    matcher, _ = steer(compiler, json_grammar(budget=6), "ok</think>", 0)
    assert feed(hf, matcher, "\n\n", '{"a": 1, "ok": true}') and matcher.is_accepting()


def test_a_tag_across_the_budget_still_closes(compiler: GrammarCompiler, hf: Any) -> None:
    """`a b` `</` `think` at tokens 1-4 of a budget of 4: the full tag is forced after the
    partial one; the block ends at the first complete tag."""
    matcher, drawn = steer(compiler, json_grammar(budget=4), "a b</think", 3)
    assert drawn == b"</think>"
    assert feed(hf, matcher, '{"a": 1, "ok": true}') and matcher.is_accepting()


def test_without_a_budget_thinking_runs_on(compiler: GrammarCompiler, hf: Any) -> None:
    matcher, drawn = steer(compiler, json_grammar(), "", 40, seed=3)
    assert b"</think>" not in drawn and not matcher.is_accepting()


def test_not_opened_the_model_may_answer_at_once(compiler: GrammarCompiler, hf: Any) -> None:
    grammar = json_grammar(opened=False, budget=5)
    straight = compiler.matcher(grammar)
    assert feed(hf, straight, '{"a": 1, "ok": true}') and straight.is_accepting()
    thinking = compiler.matcher(grammar)
    assert feed(hf, thinking, "\n<think>", "hm</think>\n", '{"a": 1, "ok": true}')
    assert thinking.is_accepting()
    assert not feed(hf, compiler.matcher(grammar), "hello")
    budgeted, drawn = steer(compiler, grammar, "<think>one two three four five", 3)
    assert drawn == b"</think>"
    assert feed(hf, budgeted, '{"a": 1, "ok": true}') and budgeted.is_accepting()


def test_regex_and_lark_answers(compiler: GrammarCompiler, hf: Any) -> None:
    regex = Grammar("regex", r"[a-z]+ [0-9]{2}", think=ThinkBlock(True, 8))
    matcher = compiler.matcher(regex)
    assert feed(hf, matcher, "{hm}</think>\n\n", "abc 12") and matcher.is_accepting()
    assert allowed(compiler, matcher) == {hf.eos_token_id}
    assert not feed(hf, compiler.matcher(regex), "hm</think>abc x")
    lark = Grammar("lark", 'start: "x" NUM\nNUM: /[0-9]+/', think=ThinkBlock(False))
    matcher = compiler.matcher(lark)
    assert feed(hf, matcher, "x12") and matcher.is_accepting()
    matcher = compiler.matcher(lark)
    assert feed(hf, matcher, "<think>", THOUGHT, "</think> ", "x7") and matcher.is_accepting()
    assert not feed(hf, compiler.matcher(lark), "<think>hm</think>y")


def test_text_answer_with_a_budget(compiler: GrammarCompiler, hf: Any) -> None:
    grammar = Grammar("text", "", "max_reasoning_tokens", think=ThinkBlock(True, 4))
    matcher, drawn = steer(compiler, grammar, "one two three four", 3)
    assert drawn == b"</think>"
    assert feed(hf, matcher, "\nany </think> text { <think>")
    assert matcher.is_accepting()
    plain = Grammar("text", "", "max_reasoning_tokens", think=ThinkBlock(False, 3))
    matcher = compiler.matcher(plain)
    assert feed(hf, matcher, "hello <think> x") and matcher.is_accepting()
    assert not feed(hf, compiler.matcher(plain), " <think>", "a b c", "<|im_end|>")
    _, drawn = steer(compiler, plain, " <think>a b c", 3)  # an answer cannot open with the tag
    assert drawn == b"</think>"


def test_errors_name_the_param_and_the_cache_holds(compiler: GrammarCompiler) -> None:
    bad = Grammar("lark", "start: (((", param="tools", think=ThinkBlock(True, 3))
    with pytest.raises(GrammarError) as info:
        compiler.compile(bad)
    assert info.value.param == "tools"
    with pytest.raises(GrammarError) as info:
        compiler.compile(Grammar("json_schema", "[1]", think=ThinkBlock(False)))
    assert info.value.param == "response_format"
    grammar = json_grammar(budget=3)
    assert compiler.compile(grammar) is compiler.compile(json_grammar(budget=3))
    assert compiler.compile(grammar) is not compiler.compile(json_grammar(budget=4))


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 8])
def test_block_scan_reads_any_chunking(cut: int) -> None:
    text = b" <think>a </thi b</think>\n{}"
    for opened, block_text in [(False, text), (True, b"x" + text[8:])]:
        scan = BlockScan.of(ThinkBlock(opened))
        assert scan is not None and scan.phase == (INSIDE if opened else BEFORE)
        answer = b""
        for i in range(0, len(block_text), cut):
            scan, part = scan.after(block_text[i : i + cut])
            answer += part
        assert scan.phase == AFTER and answer == b"\n{}"
    scan, part = BlockScan.of(ThinkBlock(False)).after(b"\n{")  # no block: all answer
    assert scan.phase == AFTER and part == b"\n{"


# -- engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[AsyncEngine]:
    engine = start_engine(tiny_llama_dir, max_num_seqs=8)
    yield engine
    engine.shutdown()


def run(engine: AsyncEngine, grammar: Grammar, **params: Any) -> list[tuple[list[int], str]]:
    """(token ids, finish reason) of each sample."""

    async def main() -> list[tuple[list[int], str]]:
        tokens: dict[int, list[int]] = {}
        finish: dict[int, str] = {}
        request = GenerationRequest(
            "think", [1, 5, 9, 14], SamplingParams(grammar=grammar, **params)
        )
        async for out in engine.generate(request):
            assert out.error is None, out.error
            tokens.setdefault(out.index, []).extend(out.token_ids)
            finish[out.index] = out.finish_reason or ""
        return [(tokens[i], finish[i]) for i in sorted(tokens)]

    return asyncio.run(main())


def split(engine: AsyncEngine, tokens: list[int]) -> tuple[int, str]:
    """(tokens before the one that completes `</think>`, the text after the tag)."""
    decode = engine.core.tokenizer.hf.decode
    text = decode(tokens)
    assert text.count("</think>") == 1, text
    reasoning = next(i for i in range(len(tokens)) if "</think>" in decode(tokens[: i + 1]))
    return reasoning, text.split("</think>")[1]


def check_json(answer: str) -> None:
    jsonschema.validate(json.loads(answer.strip()), SCHEMA)


def test_engine_json_after_a_reasoning_budget(engine: AsyncEngine) -> None:
    [(tokens, finish)] = run(engine, json_grammar(budget=6), max_tokens=80, temperature=0.0)
    reasoning, answer = split(engine, tokens)
    assert 6 <= reasoning <= 6 + 3  # six free tokens, then the forced tag's
    check_json(answer)
    assert finish == "stop"


def test_engine_text_answer_after_the_budget(engine: AsyncEngine) -> None:
    grammar = Grammar("text", "", "max_reasoning_tokens", think=ThinkBlock(True, 5))
    [(tokens, _)] = run(engine, grammar, max_tokens=24, temperature=0.0)
    reasoning, _ = split(engine, tokens)
    assert 5 <= reasoning <= 5 + 3 and len(tokens) == 24  # the answer runs on freely


@pytest.mark.parametrize("budget", [None, 500])
def test_engine_closes_the_block_within_max_tokens(engine: AsyncEngine, budget: int | None) -> None:
    """No reasoning budget, or one past max_tokens: the closing steer closes the block in
    time for the answer, at any seed."""
    for tokens, finish in run(
        engine, json_grammar(budget=budget), max_tokens=40, temperature=1.0, seed=7, n=4
    ):
        reasoning, answer = split(engine, tokens)
        check_json(answer)
        assert finish == "stop" and reasoning > 10


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("budget", [None, 0, 3, 30])
def test_adversaries_close_block_and_answer(
    engine: AsyncEngine, style: str, budget: int | None
) -> None:
    """Under test_closing's adversaries (logits that open strings, escapes, long tokens,
    noise), every sample closes its block within the budget and then completes its JSON."""
    grammar = json_grammar(budget=budget)
    for text, finish in generate(engine, style, 11, grammar, max_tokens=48, n=3, seed=5):
        assert finish == "stop", text
        thought, answer = text.split("</think>", 1)
        check_json(answer)
        assert budget != 0 or thought == ""  # (token counts: the other engine tests)
