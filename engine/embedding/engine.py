"""The embedding engine: inputs of every request batched into forwards on the model's own thread.

`EmbeddingEngine.embed` tokenizes a request off the event loop (instruction prefix first, special
tokens added), checks it, and queues its inputs on the batching thread (engine/batched/thread.py:
length buckets, right-padded forwards under `torch.inference_mode()`); each bucket's hidden
states are pooled (pooling.py), and a request's vectors are normalised once all are done.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from hearth.engine.batched.thread import BatchedEngine, Job, padded
from hearth.engine.config import EngineSettings
from hearth.engine.embedding.pooling import PoolingConfig, finish, pool
from hearth.engine.types import EmbeddingRequest, EmbeddingResult, InvalidRequestError


class EmbeddingEngine(BatchedEngine):
    """Implements engine.types.EmbeddingClient (and the EngineClient calls the server makes of
    every model) over an embedding model; generation calls are a 400 naming the model."""

    thread_name = "hearth-embed"
    serves = "/v1/embeddings"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pooling: PoolingConfig,
        settings: EngineSettings,
        max_len: int,
        device: torch.device,
        threads: int = 0,
        max_inputs: int = 2048,
    ) -> None:
        super().__init__(tokenizer, settings, max_len, device, threads, max_inputs)
        self.model = model
        self.pooling = pooling
        self.vocab_size = model.get_input_embeddings().weight.shape[0]

    # -- EmbeddingClient ----------------------------------------------------------------------
    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """The request's vectors; InvalidRequestError names `input[i]` (or the field) at fault."""
        self._check_alive()
        if request.dimensions is not None:
            self._check_dimensions(request.dimensions)
        ids = await asyncio.to_thread(self._token_ids, request)
        return await self.submit(ids, request.dimensions)

    def _check_dimensions(self, dimensions: int) -> None:
        allowed = self.pooling.matryoshka_dimensions
        if not allowed:
            raise InvalidRequestError(
                f"The model '{self.info.model_id}' does not support 'dimensions' (it is not a "
                "Matryoshka model).",
                "dimensions",
            )
        if dimensions not in allowed:
            raise InvalidRequestError(
                f"dimensions must be one of {allowed} for the model '{self.info.model_id}', got "
                f"{dimensions}.",
                "dimensions",
            )

    def _token_ids(self, request: EmbeddingRequest) -> list[list[int]]:
        """Token ids per input (texts with their instruction prefix), checked for length."""
        if not request.inputs:
            raise InvalidRequestError("input must not be empty.", "input")
        if isinstance(request.inputs[0], str):
            prefix = self._prefix(request.prompt_name)
            for i, text in enumerate(request.inputs):
                if not text:
                    raise InvalidRequestError(f"input[{i}] is an empty string.", "input")
            texts = [prefix + str(text) for text in request.inputs]
            ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        else:
            ids = [list(map(int, row)) for row in request.inputs]
            for i, row in enumerate(ids):
                if not row:
                    raise InvalidRequestError(f"input[{i}] is an empty list of tokens.", "input")
                if not all(0 <= t < self.vocab_size for t in row):
                    raise InvalidRequestError(
                        f"input[{i}] has token ids outside the vocabulary [0, {self.vocab_size}).",
                        "input",
                    )
        for i, row in enumerate(ids):
            if len(row) > self.max_len:
                raise InvalidRequestError(
                    f"input[{i}] has {len(row)} tokens; this model's maximum input length is "
                    f"{self.max_len} tokens.",
                    "input",
                )
        return ids

    def _prefix(self, prompt_name: str | None) -> str:
        name = prompt_name or self.pooling.default_prompt_name
        if name is None:
            return ""
        if name not in self.pooling.prompts:
            known = ", ".join(sorted(self.pooling.prompts)) or "none"
            raise InvalidRequestError(
                f"Unknown prompt_name {name!r}; this model's prompts: {known}.", "prompt_name"
            )
        return self.pooling.prompts[name]

    # -- engine thread ------------------------------------------------------------------------
    def _forward_rows(self, bucket: list[tuple[Job, int]]) -> list[torch.Tensor]:
        ids, mask = padded([job.ids[i] for job, i in bucket], self.pad_id)  # [B, T] each
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        return list(pool(hidden, mask, self.pooling.mode).cpu())  # B x [H] float32

    def _finish(self, job: Job) -> EmbeddingResult:
        stacked = torch.stack(job.outputs)  # [N, H]
        vectors = finish(stacked, self.pooling.normalize, job.extra)  # [N, D]
        return EmbeddingResult(vectors.tolist(), sum(len(row) for row in job.ids))
