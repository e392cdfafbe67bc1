"""Items 5, 6 and 7 of issue 28 over the fake engine: tool turns paired, last round's kinds in
more shapes, allowed_tools. Each error is OpenAI's envelope naming `param`."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import create
from tests.unit.test_responses import make_client as make_responses_client
from tests.unit.test_server import assert_envelope, chat, completion, make_client

USER = {"role": "user", "content": "weather?"}


def calls(*ids: str | None) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": i, "type": "function", "function": {"name": "get", "arguments": "{}"}}
            for i in ids
        ],
    }


def result(call_id: str | None) -> dict[str, Any]:
    message = {"role": "tool", "content": "sunny"}
    if call_id is not None:
        message["tool_call_id"] = call_id
    return message


# -- item 5: tool calls and results checked against each other ---------------------------------

BAD_TURNS = {
    "tool message without tool_call_id": (
        [USER, calls("a"), result(None)],
        "messages[2].tool_call_id",
    ),
    "one of two parallel calls unanswered before the next user turn": (
        [USER, calls("a", "b"), result("a"), USER],
        "messages[1]",
    ),
    "calls unanswered at the end of the conversation": ([USER, calls("a")], "messages[1]"),
    "an assistant turn straight after unanswered calls": (
        [USER, calls("a"), {"role": "assistant", "content": "done"}],
        "messages[1]",
    ),
    "a result for an id nobody called": (
        [USER, calls("a"), result("a"), result("zzz")],
        "messages[3].tool_call_id",
    ),
    "a result with no call before it": ([USER, result("a")], "messages[1].tool_call_id"),
    "the same call answered twice": (
        [USER, calls("a"), result("a"), result("a")],
        "messages[3].tool_call_id",
    ),
}

GOOD_TURNS = {
    "parallel calls answered out of order": [USER, calls("a", "b"), result("b"), result("a")],
    "a system message between call and result": [
        USER,
        calls("a"),
        {"role": "system", "content": "note"},
        result("a"),
        USER,
    ],
    "calls without ids answered by any id": [USER, calls(None), result("x"), USER],
    "the deprecated function role": [USER, {"role": "function", "name": "get", "content": "1"}],
}


@pytest.mark.parametrize("shape", list(BAD_TURNS))
def test_unpaired_tool_turns_are_400s_naming_the_message(shape: str) -> None:
    messages, param = BAD_TURNS[shape]
    client, engine = make_client()
    assert_envelope(chat(client, messages=messages), 400, param)
    assert engine.requests == []


@pytest.mark.parametrize("shape", list(GOOD_TURNS))
def test_paired_tool_turns_pass(shape: str) -> None:
    client, _ = make_client()
    reply = chat(client, messages=GOOD_TURNS[shape])
    assert reply.status_code == 200, reply.text


# -- item 6: last round's kinds in the shapes that still failed --------------------------------


@pytest.mark.parametrize("key", ["-1", "-0", "+5", "1.5", " 3", ""])
def test_logit_bias_keys_that_are_not_token_ids(key: str) -> None:
    client, engine = make_client()
    assert_envelope(chat(client, logit_bias={key: 1}), 400, "logit_bias")
    assert_envelope(completion(client, prompt="q: x", logit_bias={key: 1}), 400, "logit_bias")
    assert engine.requests == []


def test_an_empty_completions_prompt_starts_a_document() -> None:
    client, engine = make_client()
    assert_envelope(completion(client, prompt=""), 400, "prompt")  # a model with no start token
    engine.info.document_start_id = 7
    for prompt in ("", ["", "q: x"], [[], [1, 2]]):
        reply = completion(client, prompt=prompt, max_tokens=2)
        assert reply.status_code == 200, reply.text
        assert engine.requests[-len(reply.json()["choices"])].prompt_token_ids == [7]
        assert reply.json()["usage"]["prompt_tokens"] >= 1


def test_a_prompt_alone_too_long_names_the_prompt_field() -> None:
    client, _ = make_client()  # 256 tokens of context; the fake's tokens are bytes
    long = "x" * 300
    for extra in ({}, {"max_tokens": 5}):
        messages = [{"role": "user", "content": long}]
        assert_envelope(chat(client, messages=messages, **extra), 400, "messages")
        assert_envelope(completion(client, prompt=long, **extra), 400, "prompt")
        assert_envelope(completion(client, prompt=["ok", long], **extra), 400, "prompt")
    # a prompt that fits, with a completion that does not: max_tokens is what to reduce
    assert_envelope(chat(client, max_tokens=250), 400, "max_tokens")
    assert_envelope(chat(client, max_completion_tokens=250), 400, "max_completion_tokens")
    responses, _ = make_responses_client()
    assert_envelope(create(responses, input=long), 400, "input")
    assert_envelope(create(responses, input="hi", max_output_tokens=250), 400, "max_output_tokens")


def test_an_unknown_item_reference_is_a_404() -> None:
    client, _ = make_responses_client()
    unknown = [USER, {"type": "item_reference", "id": "msg_gone"}]
    error = assert_envelope(create(client, input=unknown), 404, "input[1].id")
    assert "msg_gone" in error["message"]
    previous = assert_envelope(create(client, input="x", previous_response_id="resp_gone"), 404)
    assert previous["type"] == error["type"]


# -- item 7: tool_choice allowed_tools ---------------------------------------------------------


def tools(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "parameters": {}}} for n in names]


def allowed(mode: str, *names: str) -> dict[str, Any]:
    listed = [{"type": "function", "function": {"name": n}} for n in names]
    return {"type": "allowed_tools", "allowed_tools": {"mode": mode, "tools": listed}}


def test_chat_allowed_tools_restrict_the_calls() -> None:
    client, engine = make_client()
    engine.info.max_model_len = 4096
    reply = chat(client, tools=tools("a", "b", "c"), tool_choice=allowed("required", "c", "a"))
    assert reply.status_code == 200, reply.text
    spec = engine.requests[-1].sampling.grammar.spec
    assert '{"const": "c"}' in spec and '{"const": "a"}' in spec and '"b"' not in spec
    reply = chat(client, tools=tools("a", "b"), tool_choice=allowed("auto", "b"))
    assert reply.status_code == 200, reply.text
    prompt = engine.decode(engine.requests[-1].prompt_token_ids)
    assert engine.requests[-1].sampling.grammar is None  # auto: text or a call
    assert '"name": "b"' in prompt and '"name": "a"' not in prompt
    bad = chat(client, tools=tools("a"), tool_choice=allowed("auto", "a", "zz"))
    assert_envelope(bad, 400, "tool_choice.allowed_tools.tools[1]")
    assert_envelope(chat(client, tool_choice=allowed("auto", "a")), 400, "tool_choice")
    assert_envelope(chat(client, tools=tools("a"), tool_choice=allowed("sometimes", "a")), 400)


def test_responses_allowed_tools_restrict_the_calls_and_echo() -> None:
    client, engine = make_responses_client(FakeEngine(max_model_len=4096))
    flat = [{"type": "function", "name": n, "parameters": {}} for n in ("a", "b")]
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "b"}],
    }
    reply = create(client, input="go", tools=flat, tool_choice=choice)
    assert reply.status_code == 200, reply.text
    spec = engine.requests[-1].sampling.grammar.spec
    assert '{"const": "b"}' in spec and '"a"' not in spec
    assert reply.json()["tool_choice"] == choice
    bad = {**choice, "tools": [{"type": "function", "name": "zz"}]}
    assert_envelope(
        create(client, input="go", tools=flat, tool_choice=bad), 400, "tool_choice.tools[0]"
    )
