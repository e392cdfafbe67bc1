"""POST /tokenize and /detokenize over a fake engine: vLLM's shapes, defaults, errors, auth."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from fastapi.testclient import TestClient

from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from hearth.server.settings import ServerSettings
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_server import assert_envelope

BOS, EOS = 300, 301
HELLO = [{"role": "user", "content": "hello"}]


class SpecialEngine(FakeEngine):
    """A tokenizer that adds BOS (and, with `eos`, EOS) around every encoded text."""

    def __init__(self, eos: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.suffix = [EOS] if eos else []

    def encode(self, text: str) -> list[int]:
        return [BOS, *text.encode(), *self.suffix]

    def encode_chat(self, messages: Sequence[dict], tools=None, template_kwargs=None) -> list[int]:
        return list("".join(f"{m['role']}: {m['content']}\n" for m in messages).encode())


def make_client(engine: FakeEngine | None = None, keys: tuple[str, ...] = ()) -> TestClient:
    registry = ModelRegistry()
    registry.add(engine or FakeEngine(aliases=["fake"]))
    registry.mark_ready()
    return TestClient(create_app(registry, ServerSettings(api_keys=keys)))


def tokenize(client: TestClient, **body):
    return client.post("/tokenize", json={"model": "fake-model", **body})


def test_prompt_shape() -> None:
    response = tokenize(make_client(), prompt="hi")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "count": 2,
        "max_model_len": 256,
        "tokens": [104, 105],
        "token_strs": None,
    }


def test_token_strs_are_each_tokens_text() -> None:
    data = tokenize(make_client(), prompt="hé", return_token_strs=True).json()
    assert data["tokens"] == list("hé".encode())
    assert data["token_strs"] == ["h", "\ufffd", "\ufffd"]  # é is two byte tokens


def test_messages_count_equals_the_chat_completions_prompt_tokens() -> None:
    client = make_client(FakeEngine(aliases=["fake"], max_model_len=4096))
    messages = [{"role": "developer", "content": "be brief"}, *HELLO]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for extra in ({}, {"tools": tools}):
        counted = tokenize(client, messages=messages, **extra).json()["count"]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "fake", "messages": messages, "max_tokens": 1, **extra},
        ).json()
        assert counted == chat["usage"]["prompt_tokens"]


def test_messages_count_equals_the_responses_input_tokens() -> None:
    """/tokenize, chat and Responses prepare a turn the same way (server/turn.py): the same
    conversation and tools count the same on all three, template kwargs included."""
    client = make_client(FakeEngine(aliases=["fake"], max_model_len=4096))
    messages = [{"role": "system", "content": "be brief"}, *HELLO]
    chat_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    flat_tool = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    cases = [({}, {}), ({"tools": [chat_tool]}, {"tools": [flat_tool]})]
    for chat_extra, responses_extra in cases:
        kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
        counted = tokenize(client, messages=messages, **chat_extra, **kwargs).json()["count"]
        response = client.post(
            "/v1/responses",
            json={"model": "fake", "instructions": "be brief", "input": "hello",
                  "max_output_tokens": 1, **responses_extra, **kwargs},
        ).json()  # fmt: skip
        assert counted == response["usage"]["input_tokens"], response


def test_add_special_tokens_defaults_and_overrides() -> None:
    for eos in (False, True):
        client = make_client(SpecialEngine(eos=eos))
        suffix = [EOS] if eos else []
        assert tokenize(client, prompt="hi").json()["tokens"] == [BOS, 104, 105, *suffix]
        plain = tokenize(client, prompt="hi", add_special_tokens=False).json()["tokens"]
        assert plain == [104, 105]
        assert tokenize(client, prompt="", add_special_tokens=False).json()["tokens"] == []
        chat = tokenize(client, messages=HELLO).json()["tokens"]
        assert chat == list(b"user: hello\n")  # the template writes its own special tokens
        special = tokenize(client, messages=HELLO, add_special_tokens=True).json()["tokens"]
        assert special == [BOS, *chat, *suffix]


def test_a_null_means_the_default() -> None:
    client = make_client(SpecialEngine())
    body = {"add_special_tokens": None, "return_token_strs": None}
    assert tokenize(client, prompt="a", **body).json()["tokens"] == [BOS, 97]


def test_detokenize_round_trip_and_special_tokens_kept() -> None:
    client = make_client()
    ids = tokenize(client, prompt="héllo, wörld").json()["tokens"]
    response = client.post("/detokenize", json={"model": "fake", "tokens": ids})
    assert response.status_code == 200, response.text
    assert response.json() == {"prompt": "héllo, wörld"}
    response = client.post("/detokenize", json={"model": "fake", "tokens": [300, 104]})
    assert response.json() == {"prompt": "<|300|>h"}


@pytest.mark.parametrize("tokens", [[104, -1], ["x"], None])
def test_detokenize_bad_tokens_name_the_field(tokens) -> None:
    response = make_client().post("/detokenize", json={"model": "fake-model", "tokens": tokens})
    error = assert_envelope(response, 400)
    assert error["param"].startswith("tokens")


def test_detokenize_an_id_the_tokenizer_lacks() -> None:
    class Unknown(FakeEngine):
        def token_pieces(self, token_ids):
            return [(b"", False) if t >= 1000 else (bytes([t]), False) for t in token_ids]

    client = make_client(Unknown())
    response = client.post("/detokenize", json={"model": "fake-model", "tokens": [104, 5000]})
    assert "tokens[1]" in assert_envelope(response, 400, "tokens")["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a", "messages": HELLO}, "prompt"),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"prompt": 3}, "prompt"),
        ({"messages": HELLO, "add_generation_prompt": False}, "add_generation_prompt"),
        ({"messages": HELLO, "continue_final_message": True}, "continue_final_message"),
        ({"messages": HELLO, "chat_template": "{{ x }}"}, "chat_template"),
        ({"messages": HELLO, "mm_processor_kwargs": {"a": 1}}, "mm_processor_kwargs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"prompt": "x" * 256 * 4096}, "prompt"),
    ],
)
def test_tokenize_errors_name_the_field(body, param) -> None:
    assert_envelope(tokenize(make_client(), **body), 400, param)


def test_chat_template_kwargs_reach_the_template_as_in_chat() -> None:
    body = {"add_generation_prompt": True, "chat_template_kwargs": {}, "messages": HELLO}
    assert tokenize(make_client(), **body).status_code == 200
    engine = FakeEngine()
    seen = []
    engine.encode_chat = lambda m, t=None, k=None: seen.append(k) or [97]
    client = make_client(engine)
    kwargs = {"enable_thinking": False}
    assert tokenize(client, messages=HELLO, chat_template_kwargs=kwargs).status_code == 200
    assert seen == [kwargs]


def test_unknown_model_is_a_404_on_both() -> None:
    client = make_client()
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]})):
        response = client.post(path, json={"model": "nope", **body})
        assert assert_envelope(response, 404, "model")["code"] == "model_not_found"


def test_api_keys_guard_both() -> None:
    client = make_client(keys=("secret",))
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [97]})):
        body = {"model": "fake-model", **body}
        assert_envelope(client.post(path, json=body), 401)
        ok = client.post(path, json=body, headers={"Authorization": "Bearer secret"})
        assert ok.status_code == 200


def test_body_size_limit_and_metrics() -> None:
    client = make_client()
    response = tokenize(client, prompt="x" * (5 << 20))
    assert response.status_code == 413
    tokenize(client, prompt="a")
    metrics = client.get("/metrics").text
    assert 'hearth_http_requests_total{route="/tokenize",status="200"} 1.0' in metrics
