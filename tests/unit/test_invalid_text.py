"""Item 1 of issue 28: text that is not valid Unicode is a 400 naming the field, on every route,
decided once where the body is read (server/body_text.py); the connection stays usable."""

from __future__ import annotations

import pytest

from hearth.server.body_text import invalid_text_param
from tests.unit.test_server import assert_envelope, make_client

CUT = "emoji \\ud83d cut"  # JSON text: a lone high surrogate escape
USER = '{"role": "user", "content": "hi"}'

# (route, raw JSON body, the param named): the shapes of the kind tried
SHAPES = [
    (
        "/v1/chat/completions",
        f'{{"model": "fake-model", "messages": [{{"role": "user", "content": "{CUT}"}}]}}',
        "messages[0].content",
    ),
    (
        "/v1/chat/completions",
        '{"model": "fake-model", "messages": [{"role": "user", "content": '
        f'[{{"type": "text", "text": "{CUT}"}}]}}]}}',
        "messages[0].content[0].text",
    ),
    (  # nested inside a tool call's arguments (a JSON string holding JSON)
        "/v1/chat/completions",
        f'{{"model": "fake-model", "messages": [{USER}, {{"role": "assistant", "tool_calls": '
        '[{"id": "c1", "type": "function", "function": {"name": "f", '
        '"arguments": "{\\"a\\": \\"\\udc00\\"}"}}]}]}',
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "/v1/chat/completions",
        f'{{"model": "fake-model", "messages": [{USER}], "stop": ["ok", "{CUT}"]}}',
        "stop[1]",
    ),
    (  # in a key: the object holding it is named
        "/v1/chat/completions",
        f'{{"model": "fake-model", "messages": [{USER}], "metadata": {{"\\uDE00x": "v"}}}}',
        "metadata",
    ),
    (  # a low surrogate first, then a high one: a reversed pair is not a pair
        "/v1/chat/completions",
        '{"model": "fake-model", "messages": [{"role": "user", "content": "\\udc00\\ud800"}]}',
        "messages[0].content",
    ),
    ("/v1/completions", f'{{"model": "fake-model", "prompt": "{CUT}"}}', "prompt"),
    ("/v1/completions", f'{{"model": "fake-model", "prompt": ["ok", "{CUT}"]}}', "prompt[1]"),
    ("/v1/responses", f'{{"model": "fake-model", "input": "{CUT}"}}', "input"),
    (
        "/v1/responses",
        f'{{"model": "fake-model", "input": "hi", "instructions": "{CUT}"}}',
        "instructions",
    ),
    ("/tokenize", f'{{"model": "fake-model", "prompt": "{CUT}"}}', "prompt"),
    ("/v1/embeddings", f'{{"model": "fake-model", "input": ["{CUT}"]}}', "input[0]"),
    ("/v1/chat/completions", f'{{"model": "{CUT}", "messages": [{USER}]}}', "model"),
]


@pytest.mark.parametrize(("route", "body", "param"), SHAPES)
def test_a_lone_surrogate_is_a_400_naming_the_field(route: str, body: str, param: str) -> None:
    client, engine = make_client()
    reply = client.post(route, content=body, headers={"content-type": "application/json"})
    error = assert_envelope(reply, 400, param)
    assert "not valid Unicode" in error["message"]
    assert engine.requests == []  # never reached the engine


def test_pairs_and_escaped_backslashes_are_text() -> None:
    assert invalid_text_param(b'{"a": "\\ud83d\\ude00 ok"}') is None  # a whole pair: an emoji
    assert invalid_text_param(b'{"a": "\\\\ud83d"}') is None  # a backslash, then "ud83d"
    assert invalid_text_param(b'{"a": "\\ud83d') is None  # not JSON: the route says so
    assert invalid_text_param(b'"\\ud83d"') == (None, invalid_text_param(b'"\\ud83d"')[1])


def test_the_connection_serves_the_next_request() -> None:
    client, _ = make_client()
    bad = f'{{"model": "fake-model", "messages": [{{"role": "user", "content": "{CUT}"}}]}}'
    headers = {"content-type": "application/json"}
    assert client.post("/v1/chat/completions", content=bad, headers=headers).status_code == 400
    good = client.post(
        "/v1/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi 😀"}]},
    )
    assert good.status_code == 200, good.text
