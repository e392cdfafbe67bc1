"""Chat with reasoning models (issue 17), on the fake engine: thinking split from the answer,
streamed and not, under both peers' field names; tools and grammars after the thinking; the
controls (reasoning_effort, chat_template_kwargs, max_reasoning_tokens) reaching the template
and the engine; thinking sent back in multi-turn."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from hearth.engine.types import ThinkBlock
from hearth.server import turn
from hearth.server.reasoning import prompt_block
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import make_client as make_small_client
from tests.unit.test_tool_edges import chunks_of
from tests.unit.test_tools import CALL, CHAT_TOOLS

THOUGHT = "<think> The user wants a city. </think>  Paris."  # the fake echoes one line


def thinking_client(opened: bool = False, monkeypatch: Any = None) -> tuple[Any, FakeEngine]:
    """A fake engine with the think_tags parser; `opened`: its template opens the block (the
    fake echoes the prompt's last line, so the opening is reported rather than rendered)."""
    if opened:
        monkeypatch.setattr(turn, "prompt_block", lambda engine, ids: "open")
    engine = FakeEngine(max_model_len=4096)
    engine.info.reasoning_parser = "think_tags"
    engine.seen_kwargs = []
    encode_chat = engine.encode_chat

    def recording(messages, tools=None, template_kwargs=None):
        engine.seen_kwargs.append(template_kwargs)
        engine.seen_messages = messages
        return encode_chat(messages, tools)

    engine.encode_chat = recording
    client, _ = make_small_client(engine)
    return client, engine


def chat(client: Any, content: str = THOUGHT, **body: Any) -> Any:
    messages = body.pop("messages", [{"role": "user", "content": content}])
    return client.post(
        "/v1/chat/completions", json={"model": "fake-model", "messages": messages, **body}
    )


def streamed(client: Any, **body: Any) -> tuple[str, str, str, list[dict], dict]:
    """(reasoning_content, reasoning, content, call deltas, usage) of a streamed chat."""
    text = chat(client, stream=True, stream_options={"include_usage": True}, **body).text
    chunks = chunks_of(text)
    for chunk in chunks:  # every chunk parses as the SDK's type
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    joined = ["".join(d.get(k) or "" for d in deltas) for k in ("reasoning_content", "reasoning")]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    order = [k for d in deltas for k in ("reasoning", "content") if d.get(k)]
    assert order == sorted(order, key=("reasoning", "content").index)  # thinking first
    return *joined, content, calls, chunks[-1]["usage"]


def test_thinking_is_split_from_the_answer_streamed_and_not() -> None:
    client, _ = thinking_client()
    data = chat(client).json()
    message = data["choices"][0]["message"]
    assert message["content"] == "Paris."
    assert message["reasoning_content"] == message["reasoning"] == " The user wants a city. "
    reasoning_tokens = data["usage"]["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning_tokens == len("<think> The user wants a city. </think>")  # byte tokens
    openai.types.chat.ChatCompletion.model_validate(data)
    reasoning_content, reasoning, content, _, usage = streamed(client, content=THOUGHT)
    assert reasoning_content == reasoning == message["reasoning"] and content == "Paris."
    assert usage["completion_tokens_details"]["reasoning_tokens"] == reasoning_tokens


def test_a_block_the_template_opened_and_one_never_closed(monkeypatch) -> None:
    client, _ = thinking_client(opened=True, monkeypatch=monkeypatch)
    message = chat(client, "first, I recall.</think>Paris.").json()["choices"][0]["message"]
    assert message["reasoning_content"] == "first, I recall." and message["content"] == "Paris."
    cut = chat(client, "still thinking when the budget ran out").json()["choices"][0]
    assert cut["message"]["reasoning_content"] == "still thinking when the budget ran out"
    assert cut["message"]["content"] == ""
    monkeypatch.undo()  # a template that does not open the block
    plain_client, _ = thinking_client()
    plain = chat(plain_client, "Paris. <think>is not a block</think>").json()["choices"][0]
    assert plain["message"]["content"] == "Paris. <think>is not a block</think>"
    assert plain["message"]["reasoning_content"] is None


def test_models_without_a_reasoning_parser_keep_everything_in_content() -> None:
    client, _ = make_small_client(FakeEngine())
    data = chat(client).json()
    message = data["choices"][0]["message"]
    assert message["content"] == THOUGHT and "reasoning_content" not in message
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_tool_calls_are_parsed_from_the_answer_only() -> None:
    client, _ = thinking_client()
    thinking_call = f"<think>maybe {CALL}?</think>Let me check. {CALL}"
    message = chat(client, thinking_call, tools=CHAT_TOOLS).json()["choices"][0]["message"]
    assert message["reasoning_content"] == f"maybe {CALL}?"
    [call] = message["tool_calls"]
    assert json.loads(call["function"]["arguments"])["city"] == "Paris"
    reasoning, _, content, calls, _ = streamed(client, content=thinking_call, tools=CHAT_TOOLS)
    assert reasoning == f"maybe {CALL}?" and content == "Let me check."
    assert json.loads("".join(c["function"]["arguments"] for c in calls))["city"] == "Paris"
    only_thinking = chat(client, f"<think>{CALL}</think>No call.", tools=CHAT_TOOLS).json()
    assert "tool_calls" not in only_thinking["choices"][0]["message"]
    body = {"tools": CHAT_TOOLS, "parallel_tool_calls": False}
    one = chat(client, f"<think>{CALL}{CALL}</think>{CALL}", **body).json()["choices"][0]
    assert len(one["message"]["tool_calls"]) == 1 and one["finish_reason"] == "tool_calls"


def test_controls_reach_the_template_and_the_grammar(monkeypatch) -> None:
    client, engine = thinking_client()
    chat(client, reasoning_effort="none")
    assert engine.seen_kwargs[-1] == {"reasoning_effort": "none", "enable_thinking": False}
    kwargs = {"enable_thinking": True, "custom": 1}
    chat(client, reasoning_effort="low", chat_template_kwargs=kwargs)
    assert engine.seen_kwargs[-1] == {"reasoning_effort": "low", **kwargs}
    assert engine.requests[-1].sampling.grammar.think == ThinkBlock(opened=False, max_tokens=1024)
    chat(client, max_reasoning_tokens=7, response_format={"type": "json_object"})
    grammar = engine.requests[-1].sampling.grammar
    assert grammar.kind == "json_schema" and grammar.think == ThinkBlock(False, 7)
    chat(client)
    assert engine.requests[-1].sampling.grammar is None  # nothing asked: nothing constrained
    opened_client, opened_engine = thinking_client(opened=True, monkeypatch=monkeypatch)
    chat(opened_client, max_reasoning_tokens=0)
    assert opened_engine.requests[-1].sampling.grammar.think == ThinkBlock(True, 0)


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_thinking_sent_back_reaches_the_template(field: str) -> None:
    client, engine = thinking_client()
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello.", field: "greet back"},
        {"role": "user", "content": "ok"},
    ]
    assert chat(client, messages=messages).status_code == 200
    turn = engine.seen_messages[1]
    assert turn["reasoning_content"] == turn["reasoning"] == "greet back"


def test_bad_controls_are_400_naming_the_field() -> None:
    client, _ = thinking_client()
    for body, param in (
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"max_reasoning_tokens": -1}, "max_reasoning_tokens"),
        ({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ):
        response = chat(client, **body)
        assert response.status_code == 400, body
        assert response.json()["error"]["param"] == param


def test_where_the_prompt_leaves_the_block() -> None:
    engine = FakeEngine()
    engine.info.reasoning_parser = "think_tags"
    assert prompt_block(engine, list(b"<|im_start|>assistant\n<think>\n")) == "open"
    assert prompt_block(engine, list(b"assistant\n<think>\n\n</think>\n\n")) == "closed"
    assert prompt_block(engine, list(b"<|im_start|>assistant\n")) is None
    engine.info.reasoning_parser = "none"
    assert prompt_block(engine, list(b"assistant\n<think>\n")) is None


def test_a_block_the_prompt_closed_means_no_thinking(monkeypatch) -> None:
    monkeypatch.setattr(turn, "prompt_block", lambda engine, ids: "closed")
    client, engine = thinking_client()
    data = chat(client, max_reasoning_tokens=5, response_format={"type": "json_object"}).json()
    message = data["choices"][0]["message"]
    assert message["content"] == THOUGHT and message["reasoning_content"] is None
    assert data["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert engine.requests[-1].sampling.grammar.think is None  # the answer's grammar at once
