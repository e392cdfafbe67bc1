"""Host memory given back to the OS: glibc's free lists (`trim_host_memory`) and the address
ranges of file-backed mappings (`file_mappings`), for tensors that still pin a mapped file."""

from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path


def trim_host_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim; elsewhere nothing). Tensors
    below glibc's mmap threshold live on the heap, and freeing them leaves holes that stay
    resident until trimmed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def file_mappings() -> list[tuple[int, int]]:
    """[start, end) address ranges of this process's file-backed mappings (Linux's
    /proc/self/maps; [] elsewhere)."""
    ranges = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(value, 16) for value in fields[0].split("-"))
                ranges.append((start, end))
    return ranges
