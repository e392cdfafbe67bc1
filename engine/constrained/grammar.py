"""Constrained decoding with llguidance: compile grammars once, mask logits per step."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import llguidance
import torch

from hearth.engine.constrained import think
from hearth.engine.constrained.closing import Closer
from hearth.engine.types import JSON_STYLE, Grammar, InvalidRequestError

_BITS = torch.arange(32, dtype=torch.int32)  # [32]


class GrammarError(InvalidRequestError):
    """A grammar or schema llguidance cannot compile; names the request field it came from."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"Invalid {param}: {message}", param)


def to_llguidance(grammar: Grammar) -> str:
    """The llguidance grammar text for a torch-free Grammar description; one with a reasoning
    block (`think`) is that block, then the grammar (think.py)."""
    if grammar.think is not None:
        answer = dataclasses.replace(grammar, think=None)
        return think.compose(
            grammar.think, None if grammar.kind == "text" else to_llguidance(answer)
        )
    if grammar.kind == "text":
        return llguidance.LLMatcher.grammar_from_lark("start: /(?s:.*)/")
    if grammar.kind == "json_schema":
        schema = json.loads(grammar.spec)
        if not isinstance(schema, dict):
            raise GrammarError(grammar.param, "a JSON schema must be an object")
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_STYLE)
    if grammar.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(grammar.spec)
    return llguidance.LLMatcher.grammar_from_lark(grammar.spec)


_GGUF_BYTE_LEVEL = ["ByteFallback", "Fuse", "Replace", "ByteLevel"]


def token_view(hf_tokenizer: Any, vocab_size: int, eos: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of a fast Hugging Face tokenizer (what llguidance.hf does). One fix:
    transformers 5.17 converts byte-level GGUF vocabularies with sentencepiece decoder steps
    (ByteFallback, Fuse, Replace) before ByteLevel, which make llguidance read 'Ġ' as two
    bytes instead of a space; exactly that sequence is reduced to its ByteLevel step."""
    if not hasattr(hf_tokenizer, "backend_tokenizer"):
        raise InvalidRequestError("constrained decoding needs a fast (Rust) Hugging Face tokenizer")
    backend = copy.copy(hf_tokenizer.backend_tokenizer)
    backend.no_padding()
    backend.no_truncation()
    spec = json.loads(backend.to_str())
    decoder = spec.get("decoder") or {}
    steps = decoder.get("decoders") or []
    if decoder.get("type") == "Sequence" and [d.get("type") for d in steps] == _GGUF_BYTE_LEVEL:
        spec["decoder"] = steps[-1]
    eos_token = eos or hf_tokenizer.eos_token_id
    return llguidance.LLTokenizer(json.dumps(spec), n_vocab=vocab_size, eos_token=eos_token)


class GrammarCompiler:
    """Builds llguidance's tokenizer view lazily (~1 s) and caches compiled grammars."""

    def __init__(
        self,
        hf_tokenizer: Any,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        cache_size: int = 256,
    ) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._closer: Closer | None = None
        self._cache: OrderedDict[Grammar, llguidance.LLMatcher] = OrderedDict()  # fresh ones
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:  # built on the first compile, in a worker thread
                self._tokenizer = token_view(self._hf, self.vocab_size, self._eos)
                self._closer = Closer(self._tokenizer, self._eos)
            return self._tokenizer

    @property
    def closer(self) -> Closer:
        """Closes constrained samples within their budgets (built with the tokenizer view)."""
        if self._closer is None:
            _ = self.tokenizer
        assert self._closer is not None
        return self._closer

    def compile(self, grammar: Grammar) -> llguidance.LLMatcher:
        """Validate, compile and cache a fresh matcher; raises GrammarError. Slow for big
        grammars (up to ~1 s): call it off the event loop and the engine thread."""
        with self._lock:
            if grammar in self._cache:
                self._cache.move_to_end(grammar)
                return self._cache[grammar]
        try:
            text = to_llguidance(grammar)
        except GrammarError:
            raise
        except ValueError as exc:  # malformed JSON and the like
            raise GrammarError(grammar.param, str(exc)) from None
        error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(grammar.param, error.strip().splitlines()[0])
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(grammar.param, matcher.get_error())
        with self._lock:
            self._cache[grammar] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, grammar: Grammar) -> llguidance.LLMatcher:
        """A matcher at the grammar's start: a copy of the compiled one (cheap)."""
        return self.compile(grammar).deep_copy()

    def mask(
        self, logits: torch.Tensor, rows: Sequence[tuple[int, llguidance.LLMatcher]]
    ) -> torch.Tensor:
        """logits [B, V] with -inf on every token a row's grammar forbids next; returns [B, V]."""
        width = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(rows), width), -1, dtype=torch.int32)  # [R, W], bit set = allowed
        # On this thread, one matcher after another: a worker pool's spinning threads would
        # take CPU from torch's (masks cost ~0.1-0.5 ms per row).
        for i, (_, matcher) in enumerate(rows):
            matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), width * 4)
        index = torch.tensor([row for row, _ in rows], device=logits.device)  # [R]
        words = bitmask.to(logits.device, non_blocking=True)  # [R, W] int32
        bits = (words[:, :, None] >> _BITS.to(logits.device)) & 1  # [R, W, 32]
        allowed = bits.flatten(1)[:, : logits.shape[-1]].bool()  # [R, V]
        masked = logits.index_select(0, index).masked_fill(~allowed, float("-inf"))  # [R, V]
        return logits.index_copy(0, index, masked)  # [B, V]
