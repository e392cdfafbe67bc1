"""max_model_len fits the KV cache: a context the cache can never hold for one sequence is not
advertised (capped, with a warning) or, when max_model_len was set by hand, refused at start
with both numbers (engine/builder.py: fit_max_model_len). /v1/models' figure: tests/live/
test_max_model_len.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from hearth.engine.builder import build_engine
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import LoadError, load_model
from hearth.engine.loading.sources import resolve_source

# The tiny Llama (tests/fixtures/server.py): 2 layers x 2 KV heads x head size 16, float32:
# 512 bytes of K and V per token; its own context is 512 tokens. 128 KiB hold 256 tokens
# (16 blocks).


SMALL_KV = "128KiB"
HOLDS = 256
CONTEXT = 512


def start(checkpoint: Path, max_model_len: int | None = None, kv: str = SMALL_KV):
    config = ModelConfig(
        id="tiny",
        source=str(checkpoint),
        device="cpu",
        max_model_len=max_model_len,
        engine={"kv_cache_memory": kv, "autotune": "off"},
    )
    return build_engine(load_model(config, resolve_source(config.source)))


def test_the_models_context_is_capped_to_the_kv_cache(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="hearth.engine"):
        engine = start(tiny_llama_dir)
    try:
        assert engine.info.max_model_len == HOLDS == engine.info.kv_capacity_tokens
        assert engine.core.max_model_len == HOLDS  # what check_request enforces
    finally:
        engine.shutdown()
    assert f"max_model_len {CONTEXT} -> {HOLDS}: the KV cache holds {HOLDS} tokens" in caplog.text


def test_a_context_that_fits_is_kept(tiny_llama_dir: Path) -> None:
    engine = start(tiny_llama_dir, kv="1MiB")  # 2048 tokens: the model's 512 fit
    try:
        assert engine.info.max_model_len == CONTEXT
    finally:
        engine.shutdown()
    engine = start(tiny_llama_dir, max_model_len=200)
    try:
        assert engine.info.max_model_len == 200
    finally:
        engine.shutdown()


def test_a_configured_max_model_len_that_does_not_fit_fails_the_start(
    tiny_llama_dir: Path,
) -> None:
    with pytest.raises(LoadError) as caught:
        start(tiny_llama_dir, max_model_len=400)
    message = str(caught.value)
    assert "\n" not in message
    assert "max_model_len 400" in message and f"KV cache's {HOLDS} tokens" in message
