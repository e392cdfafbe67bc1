"""A minimal GGUF reader: scalar metadata and memory-mapped tensor data, in milliseconds.

gguf-py's GGUFReader builds Python objects for every metadata array element (SmolLM2's 49152
vocabulary strings twice over): ~10 s for a 100 MB file on a 2-core machine, too slow for
startup. This reads the same file format (ggml's docs/gguf.md, version 2 and 3: header, key/value
metadata, tensor infos, aligned data) skipping arrays without decoding them, and maps the data
read-only with numpy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# GGUF metadata value types -> struct format of a scalar (8: string, 9: array)
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 30: "BF16"}
# ggml type -> (weights per block, bytes per block), for the types whose sizes we need
_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34)}


class GGUFFormatError(ValueError):
    """Not a GGUF file hearth can read."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int  # ggml_type id (3: Q4_1, 8: Q8_0, ...)
    shape: tuple[int, ...]  # GGUF order: shape[0] is the contiguous dimension (K of a weight)
    offset: int  # byte offset of the data in the file

    @property
    def type_name(self) -> str:
        return TYPE_NAMES.get(self.ggml_type, f"type {self.ggml_type}")


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        length = self.unpack("Q")
        text = bytes(self.data[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            inner, count = self.unpack("I"), self.unpack("Q")
            if inner in _SCALARS:  # skipped: arrays are vocabularies and merges here
                self.pos += count * struct.calcsize(_SCALARS[inner])
            elif inner == _STRING:
                data, pos, length = self.data, self.pos, struct.Struct("<Q").unpack_from
                for _ in range(count):
                    pos += 8 + length(data, pos)[0]
                self.pos = pos
            else:
                for _ in range(count):
                    self.value(inner)
            return None
        raise GGUFFormatError(f"unknown metadata value type {kind}")


@dataclass
class GGUFFile:
    """Scalar metadata (arrays read as None) and tensor infos of one GGUF file."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_start: int

    def array(self, name: str) -> np.ndarray:
        """The raw bytes of a block-quantized tensor, [rows, bytes per row] (uint8, read-only)."""
        info = self.tensors[name]
        if info.ggml_type not in _BLOCKS:
            raise GGUFFormatError(f"{name}: unsupported {info.type_name}")
        per_block, block_bytes = _BLOCKS[info.ggml_type]
        row_bytes = info.shape[0] // per_block * block_bytes
        rows = int(np.prod(info.shape[1:], dtype=np.int64))
        return np.memmap(
            self.path, np.uint8, "r", offset=self.data_start + info.offset, shape=(rows, row_bytes)
        )


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header, metadata and tensor infos. Raises GGUFFormatError, OSError."""
    path = Path(path)
    with path.open("rb") as handle:
        head = handle.read(24)
        if len(head) < 24 or head[:4] != b"GGUF":
            raise GGUFFormatError(f"{path.name}: not a GGUF file")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise GGUFFormatError(f"{path.name}: GGUF version {version} is not supported")
        mapped = np.memmap(path, np.uint8, "r")
    cursor = _Cursor(memoryview(mapped))
    cursor.pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("I"))
    tensors: dict[str, TensorInfo] = {}
    for _ in range(tensor_count):
        name = cursor.string()
        dims = cursor.unpack("I")
        shape = tuple(int(cursor.unpack("Q")) for _ in range(dims))
        ggml_type, offset = cursor.unpack("I"), cursor.unpack("Q")
        tensors[name] = TensorInfo(name, ggml_type, shape, offset)
    alignment = int(metadata.get("general.alignment") or 32)
    start = -(-cursor.pos // alignment) * alignment
    return GGUFFile(path, metadata, tensors, start)
