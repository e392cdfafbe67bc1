"""Each token's raw bytes, read from its vocabulary entry rather than by decoding it alone.

Decoding one token at a time is lossy: a byte-level BPE piece that holds half a UTF-8 character
decodes to U+FFFD, and special tokens decode to "" when skipped. Logprobs need the exact bytes:
for byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) each character of a token maps back to one byte
through GPT-2's byte table; for SentencePiece vocabularies `▁` is a space and `<0xNN>` one byte.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import cache
from typing import Any

TokenPiece = tuple[bytes, bool]  # (raw bytes, is a special token)

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's table from the printable characters of byte-level BPE back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def _is_byte_level(hf: Any) -> bool:
    backend = getattr(hf, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return "ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(
        getattr(decoder, "__getstate__", lambda: b"")()
    )


class TokenBytes:
    """Raw bytes of token ids for one Hugging Face tokenizer (cached per id)."""

    def __init__(self, hf: Any) -> None:
        self.hf = hf
        self.byte_level = _is_byte_level(hf)
        added = getattr(hf, "added_tokens_decoder", {}) or {}
        self.added = {
            int(i): (t.content, bool(getattr(t, "special", True))) for i, t in added.items()
        }
        self.special = set(getattr(hf, "all_special_ids", ()) or ())
        self._cache: dict[int, TokenPiece] = {}

    def pieces(self, token_ids: Sequence[int]) -> list[TokenPiece]:
        return [self.piece(t) for t in token_ids]

    def piece(self, token_id: int) -> TokenPiece:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._read(token_id)
        return found

    def _read(self, token_id: int) -> TokenPiece:
        if token_id in self.added:  # added tokens are stored as plain text
            content, special = self.added[token_id]
            return content.encode(), special or token_id in self.special
        token = self.hf.convert_ids_to_tokens(token_id)
        if token is None:
            return b"", False
        if self.byte_level:
            table = gpt2_byte_decoder()
            if all(c in table for c in token):
                return bytes(table[c] for c in token), token_id in self.special
        match = _BYTE_TOKEN.match(token)
        if match:  # SentencePiece byte fallback
            return bytes([int(match.group(1), 16)]), False
        return token.replace("\u2581", " ").encode(), token_id in self.special
