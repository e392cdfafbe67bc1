"""Faults inside the engine: a failing request fails alone, a dead thread turns 503 (tiny model)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.types import (
    EngineDeadError,
    GenerationRequest,
    Grammar,
    InvalidRequestError,
    SamplingParams,
)
from hearth.server.app import create_app
from hearth.server.registry import ModelRegistry
from tests.engine.test_engine import prompts, start_engine


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path):
    engine = start_engine(tiny_llama_dir)
    yield engine
    engine.shutdown()


@pytest.fixture
def poisoned(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> AsyncEngine:
    """The runner raises for any step that holds a request whose id starts with 'poison'."""
    execute = engine.core.runner.execute

    def faulty(scheduled):
        if any(item.seq.request_id.startswith("poison") for item in scheduled):
            raise RuntimeError("injected fault")
        return execute(scheduled)

    monkeypatch.setattr(engine.core.runner, "execute", faulty)
    return engine


async def run(engine: AsyncEngine, rid: str, prompt: list[int], **params) -> dict:
    tokens: list[int] = []
    reason, error = None, None
    request = GenerationRequest(rid, prompt, SamplingParams(**params))
    async for out in engine.generate(request):
        tokens += out.token_ids
        reason, error = out.finish_reason or reason, out.error or error
    return {"tokens": tokens, "reason": reason, "error": error}


def idle(engine: AsyncEngine) -> tuple[int, int, int]:
    stats = engine.stats()
    return stats.num_running, stats.num_waiting, stats.kv_blocks_used


def test_a_failing_request_fails_alone_in_a_shared_batch(poisoned: AsyncEngine) -> None:
    greedy = dict(temperature=0, max_tokens=12, ignore_eos=True)
    batch = prompts(4)

    async def main() -> list[dict]:
        jobs = [run(poisoned, f"ok-{i}", p, **greedy) for i, p in enumerate(batch[:3])]
        jobs.insert(1, run(poisoned, "poison-1", batch[3], **greedy))
        return await asyncio.gather(*jobs)

    results = asyncio.run(main())
    bad = results.pop(1)
    assert bad["reason"] == "error" and "injected fault" in bad["error"]
    alone = [asyncio.run(run(poisoned, f"solo-{i}", p, **greedy)) for i, p in enumerate(batch[:3])]
    assert [r["tokens"] for r in results] == [r["tokens"] for r in alone]
    assert all(r["reason"] == "length" and r["error"] is None for r in results)
    assert idle(poisoned) == (0, 0, 0) and poisoned.is_alive


def test_bad_requests_are_refused_and_never_reach_the_thread(engine: AsyncEngine) -> None:
    async def main() -> None:
        for params, match in (
            (dict(seed=2**70), "seed"),
            (dict(stop_token_ids=[10**9], min_tokens=2), "stop_token_ids"),
        ):
            with pytest.raises(ValueError, match=match):
                await run(engine, "bad", prompts(1)[0], max_tokens=3, **params)

    asyncio.run(main())
    assert engine.is_alive


def test_client_errors_are_invalid_request_errors_naming_the_field(engine: AsyncEngine) -> None:
    """What the client can fix raises InvalidRequestError (the server's only 400), with the
    request field at fault where the engine knows it; messages stay as they were."""
    from hearth.engine.constrained.grammar import GrammarError
    from hearth.engine.text.tokenizer import TemplateError

    def check(prompt: list[int], **params) -> InvalidRequestError:
        request = GenerationRequest("bad", prompt, SamplingParams(**params))
        with pytest.raises(InvalidRequestError) as caught:
            engine.core.check_request(request)
        return caught.value

    prompt = prompts(1)[0]
    assert check(prompt, max_tokens=3, seed=2**70).param == "seed"
    assert check(prompt, max_tokens=3, stop_token_ids=[10**9]).param == "stop_token_ids"
    assert check([10**9], max_tokens=3).param == "prompt"
    too_long = check([5] * 600, max_tokens=4)
    assert "maximum context length is 512" in str(too_long) and too_long.param is None
    assert str(check([], max_tokens=3)) == "the prompt is empty"
    with pytest.raises(InvalidRequestError, match=r"^top_p must be in \[0, 1\]$") as caught:
        SamplingParams(top_p=2)
    assert caught.value.param == "top_p"
    bad = Grammar("json_schema", '{"type": "nope"}', param="response_format.json_schema")
    with pytest.raises(GrammarError) as grammar_error:
        engine.core.grammars.compile(bad)
    assert isinstance(grammar_error.value, InvalidRequestError)
    assert grammar_error.value.param == "response_format.json_schema"
    with pytest.raises(GrammarError) as grammar_error:  # said once, not wrapped twice
        engine.core.grammars.compile(Grammar("json_schema", "[1]"))
    assert str(grammar_error.value) == "Invalid response_format: a JSON schema must be an object"
    template_error = TemplateError("chat template error: no")
    assert isinstance(template_error, InvalidRequestError) and template_error.param is None


def test_an_unexpected_error_adding_a_request_fails_it_alone(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    add = engine.core.add_request

    def faulty(request: GenerationRequest) -> None:
        if request.request_id == "boom":
            raise RuntimeError("cannot add")
        add(request)

    monkeypatch.setattr(engine.core, "add_request", faulty)
    bad = asyncio.run(run(engine, "boom", prompts(1)[0], max_tokens=3, n=2))
    assert bad["reason"] == "error" and "cannot add" in bad["error"]
    good = asyncio.run(run(engine, "fine", prompts(1)[0], max_tokens=3, temperature=0))
    assert good["error"] is None and len(good["tokens"]) >= 1 and engine.is_alive


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_fails_in_flight_requests_and_refuses_new_ones(
    tiny_llama_dir: Path,
) -> None:
    engine = start_engine(tiny_llama_dir)
    apply = engine._apply

    def deadly(commands):
        if any(kind == "add" and p.request_id == "kill" for kind, p in commands):
            raise SystemError("engine bug")
        return apply(commands)

    engine._apply = deadly
    long = dict(temperature=0, max_tokens=400, ignore_eos=True)

    async def main() -> dict:
        victim = asyncio.ensure_future(run(engine, "victim", prompts(1)[0], **long))
        await asyncio.sleep(0.2)
        killer = await run(engine, "kill", prompts(1)[0], max_tokens=2)
        assert killer["reason"] == "error" and "engine bug" in killer["error"]
        return await asyncio.wait_for(victim, 10)

    victim = asyncio.run(main())
    assert victim["reason"] == "error" and "engine bug" in victim["error"]
    assert not engine.is_alive
    with pytest.raises(EngineDeadError):
        asyncio.run(run(engine, "after", prompts(1)[0], max_tokens=2))
    client = TestClient(create_app(registry_of(engine)))
    assert client.get("/health").status_code == 503
    reply = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
    assert reply.status_code == 503 and reply.json()["error"]["code"] == "engine_dead"


def registry_of(engine: AsyncEngine) -> ModelRegistry:
    registry = ModelRegistry()
    registry.add(engine)
    registry.mark_ready()
    return registry


def test_a_failing_request_over_http_is_500_or_an_error_event(poisoned: AsyncEngine) -> None:
    client = TestClient(create_app(registry_of(poisoned)))
    # The request id is the server's; poison by prompt instead: the marker token 7 first.
    execute = poisoned.core.runner.execute

    def by_prompt(scheduled):
        for item in scheduled:
            if item.seq.prompt_ids[:3] == [7, 7, 7]:
                raise RuntimeError("injected fault")
        return execute(scheduled)

    poisoned.core.runner.execute = by_prompt
    bad = {"model": "tiny", "prompt": [7, 7, 7, 9], "max_tokens": 3}
    good = {"model": "tiny", "prompt": [9, 8, 7, 6], "max_tokens": 3, "temperature": 0}
    reply = client.post("/v1/completions", json=bad)
    assert reply.status_code == 500
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "injected" in error["message"]
    streamed = client.post("/v1/completions", json={**bad, "stream": True}).text
    events = [e.removeprefix("data: ") for e in streamed.strip().split("\n\n")]
    assert events[-1] == "[DONE]" and "injected" in json.loads(events[-2])["error"]["message"]
    ok = client.post("/v1/completions", json=good)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert idle(poisoned) == (0, 0, 0) and client.get("/health").status_code == 200
