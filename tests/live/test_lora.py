"""LoRA adapters on a live hearth, through the openai SDK: two adapters and the base in one
concurrent burst equal PEFT + transformers; vLLM's runtime load/unload routes (API key, 400s,
unload waiting for requests in flight); a one-line start-up error for a bad adapter."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fixtures.lora import build_adapter, peft_greedy
from tests.fixtures.server import ROOT, running_server

pytest.importorskip("peft")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow
KEY = "lora-test-key"
N = 8


def write_config(path: Path, checkpoint: Path, loras: list[dict], **top: object) -> Path:
    model = {"id": "tiny", "source": str(checkpoint), "device": "cpu"}
    model["engine"] = {"kv_cache_memory": "64MiB", "max_loras": 2, "max_lora_rank": 16}
    path.write_text(json.dumps({"models": [model], "loras": loras, **top}))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("live-loras")
    return {
        name: build_adapter(tiny_llama_dir, root / name, name) for name in ("qv4", "all8", "kv2")
    }


@pytest.fixture(scope="module")
def live(tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    loras = [{"id": "tiny-qv4", "source": str(adapters["qv4"])}]
    loras.append({"id": "tiny-all8", "source": str(adapters["all8"]), "base": "tiny"})
    config = write_config(tmp_path_factory.mktemp("cfg") / "models.yaml", tiny_llama_dir, loras)
    args = ("--config", str(config), "--autotune", "off", "--allow-runtime-lora", "--api-key", KEY)
    with running_server(*args) as (base_url, _):
        yield base_url


def prompts() -> list[list[int]]:
    return [[1, 2000 + 37 * i, 513, 77 + i, 9001, 42] for i in range(6)]


def test_models_list_adapters_with_parent(live: str) -> None:
    client = openai.OpenAI(base_url=live, api_key=KEY)
    cards = {m.id: m.model_dump() for m in client.models.list().data}
    assert cards["tiny-qv4"]["parent"] == "tiny" and cards["tiny-all8"]["parent"] == "tiny"
    assert "parent" not in cards["tiny"]


def test_concurrent_burst_equals_peft(live: str, tiny_llama_dir: Path, adapters: dict) -> None:
    """Base and two adapters interleaved in one burst: each greedy output is PEFT's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    models = {"tiny": None, "tiny-qv4": adapters["qv4"], "tiny-all8": adapters["all8"]}
    jobs = [(p, list(models)[i % 3]) for i, p in enumerate(prompts())]

    async def burst() -> list[str]:
        client = openai.AsyncOpenAI(base_url=live, api_key=KEY)
        calls = [
            client.completions.create(
                model=model, prompt=p, max_tokens=N, temperature=0, extra_body={"ignore_eos": True}
            )
            for p, model in jobs
        ]
        return [r.choices[0].text for r in await asyncio.gather(*calls)]

    got = asyncio.run(burst())
    expected = [tokenizer.decode(peft_greedy(tiny_llama_dir, models[m], p, N)) for p, m in jobs]
    assert got == expected
    chat = openai.OpenAI(base_url=live, api_key=KEY).chat.completions.create(
        model="tiny-qv4", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert chat.model == "tiny-qv4" and chat.choices[0].finish_reason in ("stop", "length")
    response = openai.OpenAI(base_url=live, api_key=KEY).responses.create(
        model="tiny-all8", input="hi", max_output_tokens=4
    )
    assert response.model == "tiny-all8" and response.status in ("completed", "incomplete")
    tokens = httpx.post(
        f"{live.removesuffix('/v1')}/tokenize",
        json={"model": "tiny-all8", "prompt": "hi there"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert tokens.status_code == 200 and tokens.json()["count"] > 0


def test_runtime_load_unload(live: str, tiny_llama_dir: Path, adapters: dict) -> None:
    from transformers import AutoTokenizer

    root = live.removesuffix("/v1")
    body = {"lora_name": "rt", "lora_path": str(adapters["kv2"])}
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(f"{root}/v1/load_lora_adapter", json=body).status_code == 401
    bad = httpx.post(
        f"{root}/v1/load_lora_adapter", json={**body, "lora_path": "/nope"}, headers=auth
    )
    assert bad.status_code == 400 and "LoRA adapter 'rt'" in bad.json()["error"]["message"]
    loaded = httpx.post(f"{root}/v1/load_lora_adapter", json=body, headers=auth)
    assert loaded.status_code == 200, loaded.text
    again = httpx.post(f"{root}/v1/load_lora_adapter", json=body, headers=auth)
    assert again.status_code == 400
    prompt = prompts()[0]
    expected = peft_greedy(tiny_llama_dir, adapters["kv2"], prompt, 48)

    async def unload_under_load() -> tuple[list, int]:
        client = openai.AsyncOpenAI(base_url=live, api_key=KEY)
        runs = [
            asyncio.create_task(
                client.completions.create(
                    model="rt",
                    prompt=prompt,
                    max_tokens=48,
                    temperature=0,
                    logprobs=0,
                    extra_body={"ignore_eos": True},
                )
            )
            for _ in range(3)
        ]
        await asyncio.sleep(0.3)  # the requests are running
        async with httpx.AsyncClient(timeout=60) as http:
            gone = await http.post(
                f"{root}/v1/unload_lora_adapter", json={"lora_name": "rt"}, headers=auth
            )
        return await asyncio.gather(*runs), gone.status_code

    results, status = asyncio.run(unload_under_load())
    assert status == 200
    for result in results:  # every request finished, with the adapter to the end
        assert result.usage.completion_tokens == 48
        assert result.choices[0].text == AutoTokenizer.from_pretrained(tiny_llama_dir).decode(
            expected
        )
    client = openai.OpenAI(base_url=live, api_key=KEY)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="rt", prompt=prompt, max_tokens=2)
    gone = httpx.post(f"{root}/v1/unload_lora_adapter", json={"lora_name": "rt"}, headers=auth)
    assert gone.status_code == 404


def test_bad_adapter_is_a_one_line_startup_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "models.yaml", tiny_llama_dir, [{"id": "broken", "source": str(tmp_path)}]
    )
    run = subprocess.run(
        [sys.executable, "-m", "hearth", "serve", "--config", str(config), "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if "LoRA adapter 'broken'" in line]
    assert len(lines) == 1 and "no adapter_config.json" in lines[0]
