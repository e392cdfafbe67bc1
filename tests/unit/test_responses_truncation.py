"""Item 3 of issue 28: Responses `truncation`. "auto" drops the oldest input items until the
prompt fits (instructions and the last item kept), and is echoed; "disabled" (the default) is a
400 naming `input`; any other value a 400 naming `truncation`."""

from __future__ import annotations

from tests.unit.test_responses import create, make_client
from tests.unit.test_server import assert_envelope


def said(i: int) -> dict[str, str]:
    return {"role": "user", "content": f"turn {i}: " + "x" * 50}


def test_auto_drops_the_oldest_items_until_the_prompt_fits() -> None:
    client, engine = make_client()  # 256 tokens; the fake's tokens are bytes
    items = [said(i) for i in range(8)]
    assert_envelope(create(client, input=items), 400, "input")
    reply = create(client, input=items, truncation="auto", instructions="be brief")
    assert reply.status_code == 200, reply.text
    assert reply.json()["truncation"] == "auto"
    prompt = engine.decode(engine.requests[-1].prompt_token_ids)
    assert prompt.startswith("system: be brief\n")
    assert "turn 7" in prompt and "turn 0" not in prompt
    assert len(engine.requests[-1].prompt_token_ids) < 256
    kept = sum(f"turn {i}:" in prompt for i in range(8))
    assert kept >= 2  # as many as fit: dropping one fewer would not
    assert create(client, input="hi").json()["truncation"] == "disabled"


def test_auto_leaves_room_for_max_output_tokens() -> None:
    client, engine = make_client()
    items = [said(i) for i in range(3)]
    assert create(client, input=items, truncation="auto").status_code == 200
    whole = len(engine.requests[-1].prompt_token_ids)
    reply = create(client, input=items, truncation="auto", max_output_tokens=256 - whole + 1)
    assert reply.status_code == 200, reply.text
    assert len(engine.requests[-1].prompt_token_ids) < whole


def test_auto_over_a_stored_conversation() -> None:
    client, engine = make_client()
    previous = None
    for i in range(6):
        reply = create(client, input=[said(i)], truncation="auto", previous_response_id=previous)
        assert reply.status_code == 200, reply.text
        previous = reply.json()["id"]
    prompt = engine.decode(engine.requests[-1].prompt_token_ids)
    assert "turn 5" in prompt and "turn 0" not in prompt


def test_a_last_item_that_alone_does_not_fit_names_input() -> None:
    client, _ = make_client()
    items = [said(0), {"role": "user", "content": "y" * 400}]
    assert_envelope(create(client, input=items, truncation="auto"), 400, "input")


def test_dropped_calls_take_their_results_along() -> None:
    client, engine = make_client()
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    result = {"type": "function_call_output", "call_id": "c1", "output": "y" * 120}
    items = [said(0), call, result, said(1), said(2)]
    reply = create(client, input=items, truncation="auto")
    assert reply.status_code == 200, reply.text
    prompt = engine.decode(engine.requests[-1].prompt_token_ids)
    assert not prompt.startswith("tool:")


def test_an_invalid_truncation_is_a_400() -> None:
    client, _ = make_client()
    for value in ("sometimes", 1, "AUTO"):
        assert_envelope(create(client, input="hi", truncation=value), 400, "truncation")
