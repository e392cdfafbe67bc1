"""LoRA adapters in the engine, on the tiny Llama with PEFT adapters built here: greedy outputs
equal PEFT's merged model through transformers' generate(), adapters and the base mixed in one
step; the slot pool (LRU, max_loras), prefix-cache keys per adapter, validation, unload."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.block_manager import BlockManager
from hearth.engine.lora import AdapterError
from hearth.engine.sequence import Sequence
from hearth.engine.types import InvalidRequestError, SamplingParams
from tests.engine.test_engine import collect, start_engine
from tests.fixtures.lora import ADAPTERS, build_adapter, peft_greedy

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: build_adapter(tiny_llama_dir, root / name, name) for name in ADAPTERS}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, adapters: dict[str, Path]):
    engine = start_engine(tiny_llama_dir, max_loras=2, max_lora_rank=16)
    for name, path in adapters.items():
        engine.core.loras.load(name, str(path))
    yield engine
    engine.shutdown()


def prompts(n: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(3, 49152, (4 + 5 * i,), generator=gen).tolist() for i in range(n)]


async def run_all(engine: AsyncEngine, jobs: list[tuple[list[int], str | None]], n: int) -> list:
    runs = [
        collect(engine, f"r{i}", prompt, max_tokens=n, temperature=0, lora=name)
        for i, (prompt, name) in enumerate(jobs)
    ]
    return [r["tokens"][0] for r in await asyncio.gather(*runs)]


def test_mixed_batch_equals_peft_merged_generate(
    engine: AsyncEngine, tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """Two adapters and the base in the same steps (max_loras=2): each request's greedy tokens
    are PEFT + transformers' for its adapter, and the adapters do change the output."""
    names = [None, "qv4", "all8"]
    jobs = [(p, names[i % 3]) for i, p in enumerate(prompts(6))]
    got = asyncio.run(run_all(engine, jobs, 10))
    expected = [peft_greedy(tiny_llama_dir, n and adapters[n], p, 10) for p, n in jobs]
    assert got == expected
    prompt = jobs[0][0]
    outs = {n: peft_greedy(tiny_llama_dir, n and adapters[n], prompt, 10) for n in names}
    assert len({tuple(v) for v in outs.values()}) == 3, "the adapters should differ"


def test_more_adapters_than_slots_all_match(
    engine: AsyncEngine, tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """Four adapters (ranks 2-16, rsLoRA, MLP and attention targets) through two slots: the
    scheduler holds back the third adapter until a slot is idle; every output still matches."""
    jobs = [(p, name) for p, name in zip(prompts(8), [*ADAPTERS, *ADAPTERS], strict=True)]
    got = asyncio.run(run_all(engine, jobs, 6))
    assert got == [peft_greedy(tiny_llama_dir, adapters[n], p, 6) for p, n in jobs]
    assert sum(slot is not None for slot in map(engine.core.loras.slot_of, ADAPTERS)) == 2


def test_no_adapter_no_hooks(tiny_llama_dir: Path) -> None:
    """Without adapters the base path is untouched: no hooks, the step context does nothing."""
    engine = start_engine(tiny_llama_dir)
    try:
        model = engine.core.runner.model
        assert not any(m._forward_hooks for m in model.modules())
        asyncio.run(collect(engine, "b", [5, 6, 7], max_tokens=3, temperature=0))
        assert engine.core.loras.steps == 0 and not engine.core.loras.stacks
    finally:
        engine.shutdown()


def test_prefix_cache_is_keyed_by_adapter(engine: AsyncEngine) -> None:
    blocks = BlockManager(8, 4)
    blocks.cache_root = engine.core.loras.cache_root
    names = (None, "qv4", "all8")
    seqs = [Sequence("r", 0, list(range(20)), SamplingParams(lora=n)) for n in names]
    keys = [blocks.prefix_keys(s) for s in seqs]
    assert keys[0][0][0] == 0  # the base model's chain starts as before
    assert len({k[0] for k in keys}) == 3 and len({k[-1] for k in keys}) == 3


def test_unknown_adapter_is_a_400(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidRequestError, match="'nope' is not loaded"):
        asyncio.run(collect(engine, "x", [5, 6, 7], max_tokens=2, lora="nope"))


def _edit_config(src: Path, dst: Path, **changes: object) -> Path:
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_validation_names_the_adapter_and_leaves_nothing(
    engine: AsyncEngine, adapters: dict[str, Path], tmp_path: Path, tiny_llama_dir: Path
) -> None:
    loras = engine.core.loras
    before = loras.names()
    big = tmp_path / "big"
    cases = {
        "missing": (str(tmp_path / "absent"), "neither a directory nor a hub id"),
        "empty": (str(tmp_path), "no adapter_config.json"),
        "dora": (str(_edit_config(adapters["qv4"], tmp_path / "d", use_dora=True)), "DoRA"),
    }
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    cases["bad"] = (str(tmp_path / "bad"), "cannot read adapter_config.json")
    for name, (path, message) in cases.items():
        with pytest.raises(AdapterError, match=rf"LoRA adapter '{name}': .*{message}"):
            loras.load(name, path)
    # rank above max_lora_rank (16 here)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    config = LoraConfig(r=32, target_modules=["q_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(big)
    with pytest.raises(AdapterError, match="'big': rank 32 exceeds max_lora_rank 16"):
        loras.load("big", str(big))
    # a target module the model does not have, and weights of another base model's shape
    tensors_dir = _edit_config(adapters["qv4"], tmp_path / "renamed")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tensors_dir / "adapter_model.safetensors"))
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in weights.items()}
    save_file(renamed, str(tensors_dir / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="'renamed': target module 'qq_proj'"):
        loras.load("renamed", str(tensors_dir))
    other = _edit_config(adapters["qv4"], tmp_path / "other")
    widened = {k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in weights.items()}
    save_file(widened, str(other / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"'other': .*trained for another base model"):
        loras.load("other", str(other))
    with pytest.raises(AdapterError, match="already loaded"):
        loras.load("qv4", str(adapters["qv4"]))
    assert loras.names() == before


def test_unload_and_reload_under_load(
    tiny_llama_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    """Loading and unloading other adapters while requests run leaves them exact; a reloaded
    name with other weights gets no stale prefix-cache blocks."""
    engine = start_engine(tiny_llama_dir, max_loras=2, max_lora_rank=16)
    try:
        long_prompt = prompts(6)[-1] * 2  # > one KV block: the prefix cache matters

        async def main() -> tuple[list, list, list]:
            await engine.load_lora("a", str(adapters["qv4"]))
            busy = [
                collect(engine, f"b{i}", p, max_tokens=24, temperature=0, lora="a")
                for i, p in enumerate(prompts(3))
            ]
            tasks = [asyncio.create_task(b) for b in busy]
            await engine.load_lora("b", str(adapters["mlp16"]))  # while "a" generates
            first = await collect(engine, "x1", long_prompt, max_tokens=4, temperature=0, lora="b")
            assert engine.unload_lora("b")
            await engine.load_lora("b", str(adapters["kv2"]))  # same name, other weights
            again = await collect(engine, "x2", long_prompt, max_tokens=4, temperature=0, lora="b")
            done = await asyncio.gather(*tasks)
            return [d["tokens"][0] for d in done], first["tokens"][0], again["tokens"][0]

        busy, first, again = asyncio.run(main())
        assert busy == [peft_greedy(tiny_llama_dir, adapters["qv4"], p, 24) for p in prompts(3)]
        assert first == peft_greedy(tiny_llama_dir, adapters["mlp16"], long_prompt, 4)
        assert again == peft_greedy(tiny_llama_dir, adapters["kv2"], long_prompt, 4)
    finally:
        engine.shutdown()


def test_selection_of_config_and_flag_adapters(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """models.yaml's loras (base defaulted or named) and --lora; one-line ConfigErrors."""
    from hearth.engine.config import ConfigError
    from hearth.launch import select_models

    (tmp_path / "ad").mkdir()
    models = [{"id": "a", "source": str(tiny_llama_dir)}, {"id": "b", "source": "a/b"}]
    config = tmp_path / "models.yaml"

    def write(loras: list, **top: object) -> str:
        config.write_text(json.dumps({"models": models, "loras": loras, **top}))
        return str(config)

    chosen = select_models(write([{"id": "x", "source": "ad", "base": "b"}], allow_runtime_lora=1))
    assert [(lora.id, base) for lora, base in chosen.loras] == [("x", "b")]
    assert chosen.loras[0][0].source == str(tmp_path / "ad") and chosen.allow_runtime_lora
    one = select_models(write([]), model="a", lora_flags=["y=/some/dir"])
    assert [(lora.id, base) for lora, base in one.loras] == [("y", "a")]
    for loras, flags, message in [
        ([{"id": "x", "source": "ad"}], [], "LoRA adapter 'x': set 'base'"),
        ([{"id": "x", "source": "ad", "base": "zz"}], [], "base 'zz' is not a served model"),
        ([{"id": "a", "source": "ad", "base": "a"}], [], "model name 'a' is used twice"),
        ([], ["nonsense"], "--lora: expected ID=PATH"),
    ]:
        with pytest.raises(ConfigError, match=message) as error:
            select_models(write(loras), lora_flags=flags)
        assert "\n" not in str(error.value)
