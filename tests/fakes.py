"""A torch-free fake engine for server tests: bytes as tokens, echoes the last user message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from hearth.engine.types import (
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    ModelInfo,
    TokenLogprob,
)


def fake_prompt_logprobs(prompt: list[int], k: int) -> list[TokenLogprob | None]:
    """Made-up scores: token at position i has logprob -i/10, rank i, and k alternatives
    (token 0x21 + j at -j - 1)."""
    return [None] + [
        TokenLogprob(t, -i / 10, [(0x21 + j, -j - 1.0) for j in range(k)], i)
        for i, t in enumerate(prompt[1:], start=1)
    ]


class FakeEngine:
    """Generates the prompt's last line back, one byte-token per step."""

    def __init__(
        self, model_id: str = "fake-model", max_model_len: int = 256, aliases: Sequence[str] = ()
    ) -> None:
        self.info = ModelInfo(
            model_id,
            "fake",
            max_model_len,
            "cpu",
            "float32",
            4096,
            int(time.time()),
            list(aliases),
            {},
        )
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.alive = True
        self.delay = 0.0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: Any = None, template_kwargs: Any = None
    ) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(token_ids).decode(errors="replace")

    def token_pieces(self, token_ids: Sequence[int]) -> list[tuple[bytes, bool]]:
        """Ids below 256 are bytes; the rest are special tokens."""
        return [(bytes([t]), False) if t < 256 else (f"<|{t}|>".encode(), True) for t in token_ids]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        self.requests.append(request)
        prompt = self.decode(request.prompt_token_ids).rstrip("\n").split("\n")[-1]
        answer = list(prompt.split(": ", 1)[-1].encode())
        k = request.sampling.prompt_logprobs
        scores = None if k is None else fake_prompt_logprobs(request.prompt_token_ids, k)
        for index in range(request.sampling.n):
            limit = request.sampling.max_tokens
            tokens = answer[:limit]
            if limit == 0:  # scoring only: one last output with no token
                yield GenerationOutput(
                    request.request_id,
                    index,
                    [],
                    "",
                    len(request.prompt_token_ids),
                    0,
                    "length",
                    prompt_logprobs=scores,
                )
            try:
                for i, token in enumerate(tokens):
                    await asyncio.sleep(self.delay)
                    last = i == len(tokens) - 1
                    reason = ("length" if len(answer) > limit else "stop") if last else None
                    yield GenerationOutput(
                        request.request_id,
                        index,
                        [token],
                        chr(token),
                        len(request.prompt_token_ids),
                        i + 1,
                        reason,
                        prompt_logprobs=scores if i == 0 else None,
                    )
            except (GeneratorExit, asyncio.CancelledError):
                self.aborted.append(request.request_id)
                raise

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def fail_all(self, message: str) -> None:
        self.failed_all = message

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 256)

    @property
    def is_alive(self) -> bool:
        return self.alive

    def shutdown(self) -> None:
        self.alive = False
