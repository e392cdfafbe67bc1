"""A served model whose context the KV cache cannot hold advertises the capped max_model_len."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.engine.test_max_model_len import HOLDS, SMALL_KV
from tests.fixtures.server import running_server, tiny_config


@pytest.mark.slow
def test_served_models_advertise_the_capped_length(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "models.yaml", tiny_llama_dir, kv_cache_memory=SMALL_KV)
    with running_server("--config", str(config)) as (base_url, _):
        [model] = httpx.get(f"{base_url}/models", timeout=10).json()["data"]
    assert model["max_model_len"] == HOLDS
