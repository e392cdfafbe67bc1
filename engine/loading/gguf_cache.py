"""Convert a GGUF file once into a cached safetensors checkpoint, keyed by the file's hash."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hearth.paths import cache_dir

log = logging.getLogger("hearth.gguf")

_CHUNK = 16 * 1024 * 1024


def file_digest(path: Path) -> str:
    """sha256 of the file, memoised by (path, size, mtime) so a large file is hashed once."""
    stat = path.stat()
    memo_file = cache_dir() / "gguf-digests.json"
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    memo[key] = digest.hexdigest()
    memo_file.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(memo_file, json.dumps(memo, indent=0))
    return memo[key]


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def converted_checkpoint(gguf_path: str | Path, dtype_name: str) -> Path:
    """The cached safetensors checkpoint for this GGUF file and dtype, converting it if needed."""
    gguf_path = Path(gguf_path)
    target = cache_dir() / "gguf" / f"{file_digest(gguf_path)[:24]}-{dtype_name}"
    if (target / "config.json").is_file():
        log.info("GGUF %s: using the cached conversion in %s", gguf_path.name, target)
        return target
    log.info(
        "GGUF %s: converting once to safetensors (%s) in %s", gguf_path.name, dtype_name, target
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        _convert(gguf_path, staging, dtype_name)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf_path: Path, out_dir: Path, dtype_name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain model from its config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]
    with torch.device("meta"):
        plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
