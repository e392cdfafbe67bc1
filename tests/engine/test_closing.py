"""Constrained samples complete within their token budget, whatever the model prefers.

The engine runs a tiny random model whose logits are replaced by an adversary's: one that
prefers tokens opening strings, arrays, objects; one that prefers escapes and partial UTF-8
characters; one that prefers long tokens; plain noise. Every sample must end complete (JSON
that parses and validates against its schema, a tool call, a regex match), finished by the
grammar or end-of-sequence before max_tokens runs out, at every seed, temperature and budget
its closing plan fits in.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.types import GenerationRequest, Grammar, SamplingParams
from hearth.server.tool_parser import parse_output
from hearth.server.tools import Tool, call_grammar
from tests.engine.test_engine import start_engine

NESTED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "name": {"type": "string", "minLength": 2},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "owner": {
            "type": "object",
            "properties": {
                "email": {"type": "string"},
                "level": {"enum": ["low", "high"]},
                "scores": {"type": "array", "items": {"type": "number"}},
            },
            "required": ["email", "level", "scores"],
            "additionalProperties": False,
        },
        "note": {"type": ["string", "null"]},
    },
    "required": ["id", "name", "tags", "owner", "note"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [Tool("get_weather", "Current weather in a city", WEATHER)]
EMAIL_AND_PHONE = r"[a-z]{2,8}@[a-z]+\.(com|org) [0-9]{3}-[0-9]{4}"  # unbounded runs of letters
# name -> (grammar, schema to validate against or None, the length of its closing plan from
# the start, end-of-sequence included where the grammar does not stop by itself: the least
# budget it is guaranteed to complete in)
GRAMMARS: dict[str, tuple[Grammar, dict | None, int]] = {
    "json_object": (Grammar("json_schema", json.dumps({"type": "object"})), None, 2),
    "nested_schema": (Grammar("json_schema", json.dumps(NESTED)), NESTED, 50),
    "hermes_tool_call": (call_grammar(TOOLS, "hermes", parallel=True), None, 38),
    "regex": (Grammar("regex", EMAIL_AND_PHONE), None, 17),
}
STYLES = ("openers", "escapes", "long", "noise")


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> Iterator[AsyncEngine]:
    engine = start_engine(tiny_llama_dir, max_num_seqs=16)
    yield engine
    engine.shutdown()


def adversary(engine: AsyncEngine, style: str, seed: int) -> Callable[[Any], tuple]:
    """A runner.execute that runs the step (the KV cache stays right) and returns the
    adversary's logits instead of the model's."""
    core = engine.core
    real = core.runner.execute
    tokenizer = core.grammars.tokenizer
    texts = [tokenizer.decode_bytes([t]) for t in range(core.vocab_size)]
    if style == "openers":  # open strings, arrays, objects, escapes; never close
        weight = torch.tensor([sum(b in b'{["\\:,' for b in t) for t in texts], dtype=torch.float)
        weight = 6 * weight - 6 * torch.tensor([sum(b in b'"]}' for b in t) for t in texts])
    elif style == "escapes":  # backslashes, and bytes that start multi-byte characters
        weight = 6 * torch.tensor([sum(b == 0x5C or b >= 0x80 for b in t) for t in texts])
    elif style == "long":
        weight = 0.5 * torch.tensor([len(t) for t in texts], dtype=torch.float)
    else:
        weight = torch.zeros(len(texts))
    generator = torch.Generator().manual_seed(seed)

    def execute(scheduled: Any) -> tuple[torch.Tensor, list]:
        logits, prompt_rows = real(scheduled)  # [n, V], and prompt rows (none asked for here)
        noise = 3 * torch.randn(logits.shape, generator=generator)
        return (weight[: logits.shape[-1]] + noise).to(logits.dtype), prompt_rows

    return execute


def generate(
    engine: AsyncEngine, style: str, noise_seed: int, grammar: Grammar, **params: Any
) -> list[tuple[str, str]]:
    """(text, finish reason) of each sample of one request under the adversary."""
    core = engine.core
    core.runner.execute = adversary(engine, style, noise_seed)
    try:

        async def main() -> list[tuple[str, str]]:
            text: dict[int, str] = {}
            finish: dict[int, str] = {}
            prompt, sampling = [1, 2, 3, 4], SamplingParams(grammar=grammar, **params)
            request = GenerationRequest(f"{style}-{noise_seed}", prompt, sampling)
            async for out in engine.generate(request):
                assert out.error is None, out.error
                text[out.index] = text.get(out.index, "") + out.text
                finish[out.index] = out.finish_reason or ""
            return [(text[i], finish[i]) for i in sorted(text)]

        return asyncio.run(main())
    finally:
        del core.runner.execute  # the instance attribute goes; the method is back


def assert_complete(name: str, text: str) -> None:
    """The output is what its grammar describes, complete."""
    _, schema, _ = GRAMMARS[name]
    if name == "regex":
        assert re.fullmatch(EMAIL_AND_PHONE, text), text
        return
    if name == "hermes_tool_call":
        content, calls = parse_output(text, TOOLS, "hermes")
        assert calls and not content, text
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), WEATHER)
        return
    value = json.loads(text)
    assert isinstance(value, dict)
    if schema is not None:
        jsonschema.validate(value, schema)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.sampled_from(sorted(GRAMMARS)),
    style=st.sampled_from(STYLES),
    seed=st.integers(0, 2**16),
    extra=st.integers(0, 90),
    temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
)
def test_adversarial_samples_close_within_any_budget(
    engine: AsyncEngine, name: str, style: str, seed: int, extra: int, temperature: float
) -> None:
    grammar, _, least = GRAMMARS[name]
    max_tokens = least + extra
    outputs = generate(
        engine,
        style,
        seed,
        grammar,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        n=4,
    )
    for text, finish in outputs:
        assert finish == "stop", text  # the grammar (or end-of-sequence) ended it, in time
        assert_complete(name, text)


@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_budgets_just_past_the_close_window(engine: AsyncEngine, name: str) -> None:
    """Budgets where the old heuristic steer (48 tokens of closing bonus) let deep openings
    run out of tokens."""
    grammar, _, least = GRAMMARS[name]
    for max_tokens in (least, least + 1, 49, 64, 100, 160):
        outputs = generate(
            engine,
            "openers",
            max_tokens,
            grammar,
            max_tokens=max_tokens,
            temperature=1.0,
            seed=7,
            n=4,
        )
        for text, finish in outputs:
            assert finish == "stop", text
            assert_complete(name, text)


def test_a_budget_too_small_for_any_completion_ends_cut_off(engine: AsyncEngine) -> None:
    """Nothing valid fits in 10 tokens: the steer shortens the plan to the end, and the sample
    stops at max_tokens, as a prefix of a completion."""
    grammar, _, _ = GRAMMARS["nested_schema"]
    outputs = generate(engine, "openers", 1, grammar, max_tokens=10, temperature=1.0, n=2)
    for text, finish in outputs:
        assert finish == "length" and text.startswith('{"id": ')


def test_scan_follows_json_strings_and_escapes() -> None:
    from hearth.engine.constrained.closing import ESCAPED, IN_STRING, OUTSIDE, scan

    assert scan(OUTSIDE, b'{"a": "x') == IN_STRING
    assert scan(OUTSIDE, b'{"a": "x\\') == ESCAPED
    assert scan(OUTSIDE, b'{"a": "x\\"') == IN_STRING  # an escaped quote
    assert scan(OUTSIDE, b'{"a": "x\\\\"') == OUTSIDE  # an escaped backslash, then the quote
    assert scan(IN_STRING, b'", "') == IN_STRING


@pytest.mark.parametrize(
    ("prefix", "ending"),
    [
        ('{"a": [[[{"b": "x', '"}]]]}'),
        ('{"a": "x\\', 'n"}'),
        ('{"a": -', "0}"),
        ('{"a": 1.5e', "0}"),
        ('{"a": tr', "ue}"),
        ('{"a": [1, ', "0]}"),
    ],
)
def test_plans_close_what_is_open(engine: AsyncEngine, prefix: str, ending: str) -> None:
    """From a state mid-JSON, the plan is the short completion, ending the sample."""
    from hearth.engine.constrained.closing import ClosingState

    grammars = engine.core.grammars
    matcher = grammars.matcher(GRAMMARS["json_object"][0])
    tokens = grammars.tokenizer.tokenize_str(prefix)
    assert matcher.consume_tokens(tokens)
    state = ClosingState(matcher)
    for token in tokens:
        grammars.closer.advance(state, token)
    grammars.closer.cost(state)
    plan = b"".join(grammars.closer.token_bytes(t) for t in state.plan).decode()
    assert plan == ending
