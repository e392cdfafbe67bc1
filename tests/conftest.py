"""pytest fixtures shared by every kind of test: the data dir, a SmolLM2 tokenizer, a tiny random
Llama checkpoint (the builders themselves live in tests/fixtures/)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.server import DEFAULT_GGUF, build_tiny_checkpoint


@pytest.fixture(scope="session", autouse=True)
def hearth_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """$HEARTH_DATA_DIR in a tmp dir: `hearth serve` under test keeps its Responses store there,
    never in the user's data dir."""
    path = tmp_path_factory.mktemp("hearth-data")
    old = os.environ.get("HEARTH_DATA_DIR")
    os.environ["HEARTH_DATA_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("HEARTH_DATA_DIR", None)
    else:
        os.environ["HEARTH_DATA_DIR"] = old


@pytest.fixture(scope="session")
def smollm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer and chat template, read from the packaged GGUF file."""
    from transformers import AutoTokenizer

    from hearth.engine.loading.sources import resolve_source

    source = resolve_source(DEFAULT_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(source.gguf_dir, gguf_file=source.gguf_name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer_dir)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Each phase's report on the test item (`item.rep_call`), for fixtures that act on failure
    (tests/live/test_ui.py saves a screenshot)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
