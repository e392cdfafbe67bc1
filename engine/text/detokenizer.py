"""Incremental detokenizer: whole characters only, stop strings never emitted, deltas add up."""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]

_REPLACEMENT = "\ufffd"
# Tokens decoded before the new ones, so tokenizers that drop a leading space decode it right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Feed token ids as they come; get back the text that is safe to show.

    Text is held back while it ends in an incomplete UTF-8 sequence, or while its tail could be
    the start of a stop string. When a stop string appears, the text before it is final and
    `stopped` becomes True.
    """

    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # tokens up to here are in self.text
        self.text = ""  # all decoded text (may include held-back text)
        self._emitted = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the new safe text."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        self._advance(partial_ok=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The sequence ended for another reason: release everything held back."""
        if not self.stopped:
            self._advance(partial_ok=True)
        return self._release(final=True)

    def _advance(self, partial_ok: bool) -> None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and (partial_ok or not full.endswith(_REPLACEMENT)):
            self.text += full[len(prefix) :]
            # Keep a few decoded tokens as context; the window must end where decoded text ends.
            self._prefix_offset = min(len(self._ids) - _CONTEXT_TOKENS, self._read_offset)
            self._prefix_offset = max(0, self._prefix_offset)
            self._read_offset = len(self._ids)

    def _release(self, final: bool) -> str:
        if not self.stopped and self._stop:
            start = max(0, self._emitted - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                final = True
        end = len(self.text)
        if not final and self._stop:
            end -= self._held_back()
        delta = self.text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return min(longest, len(self.text) - self._emitted)
