"""Item 4 of issue 28: Responses `include: ["message.output_text.logprobs"]` with `top_logprobs`
fills output[].content[].logprobs, streamed (each delta's, and the done events') too."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

from hearth.engine.types import GenerationOutput, GenerationRequest, TokenLogprob
from tests.fixtures.fakes import FakeEngine
from tests.unit.test_responses import create, make_client
from tests.unit.test_server import assert_envelope

INCLUDE = ["message.output_text.logprobs"]


class ScoringEngine(FakeEngine):
    """Each byte-token at logprob -0.5, with k alternatives."""

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        k = request.sampling.logprobs
        async for output in super().generate(request):
            if k is not None:
                entries = [
                    TokenLogprob(t, -0.5, [(t, -0.5), *[(0x41 + j, -3.0) for j in range(k)]][:k])
                    for t in output.token_ids
                ]
                output = dataclasses.replace(output, logprobs=entries)
            yield output


def test_included_logprobs_fill_the_output_text() -> None:
    client, engine = make_client(ScoringEngine())
    reply = create(client, input="hello", include=INCLUDE, top_logprobs=2)
    assert reply.status_code == 200, reply.text
    part = reply.json()["output"][0]["content"][0]
    assert part["text"] == "hello"
    assert [e["token"] for e in part["logprobs"]] == list("hello")
    assert b"".join(bytes(e["bytes"]) for e in part["logprobs"]) == b"hello"
    assert all(e["logprob"] == -0.5 and len(e["top_logprobs"]) == 2 for e in part["logprobs"])
    assert reply.json()["top_logprobs"] == 2
    assert engine.requests[-1].sampling.logprobs == 2


def test_without_include_there_are_none() -> None:
    client, engine = make_client(ScoringEngine())
    part = create(client, input="hello", top_logprobs=3).json()["output"][0]["content"][0]
    assert part["logprobs"] == [] and engine.requests[-1].sampling.logprobs is None
    part = create(client, input="hello", include=INCLUDE).json()["output"][0]["content"][0]
    assert len(part["logprobs"]) == 5 and part["logprobs"][0]["top_logprobs"] == []


def test_streamed_deltas_carry_their_logprobs() -> None:
    client, _ = make_client(ScoringEngine())
    reply = create(client, input="hello", include=INCLUDE, top_logprobs=1, stream=True)
    events = [
        json.loads(line[6:]) for line in reply.text.splitlines() if line.startswith("data: {")
    ]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(d["delta"] for d in deltas) == "hello"
    assert [e["token"] for d in deltas for e in d["logprobs"]] == list("hello")
    done = next(e for e in events if e["type"] == "response.output_text.done")
    assert len(done["logprobs"]) == 5
    final = events[-1]["response"]["output"][0]["content"][0]
    assert [e["token"] for e in final["logprobs"]] == list("hello")


def test_top_logprobs_range() -> None:
    client, _ = make_client()
    assert_envelope(
        create(client, input="x", include=INCLUDE, top_logprobs=21), 400, "top_logprobs"
    )
    assert_envelope(
        create(client, input="x", include=INCLUDE, top_logprobs=-1), 400, "top_logprobs"
    )
