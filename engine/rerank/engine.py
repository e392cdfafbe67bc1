"""The rerank engine: (query, document) pairs of every request scored in batched forwards.

`RerankEngine.rerank` tokenizes a request's pairs off the event loop (engine/rerank/scoring.py:
a text pair for a cross-encoder, the prompt template for a decoder), checks their lengths
(truncating only when the request asks) and queues them on the batching thread
(engine/batched/thread.py: length buckets, padded forwards). A cross-encoder's rows are
right-padded with their token types; a decoder's are left-padded with explicit positions so that
every row's next-token logits are the last position's (`logits_to_keep=1`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from hearth.engine.batched.thread import BatchedEngine, Job, padded
from hearth.engine.config import EngineSettings
from hearth.engine.rerank.scoring import Scorer, activate, answer_scores
from hearth.engine.types import InvalidRequestError, RerankRequest, RerankResult


class RerankEngine(BatchedEngine):
    """Implements engine.types.RerankClient (and the EngineClient calls the server makes of
    every model) over a cross-encoder or a decoder reranker."""

    thread_name = "hearth-rerank"
    serves = "/v1/rerank and /score"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        scorer: Scorer,
        settings: EngineSettings,
        max_len: int,
        device: torch.device,
        threads: int = 0,
        max_inputs: int = 1024,
    ) -> None:
        super().__init__(tokenizer, settings, max_len, device, threads, max_inputs)
        self.model = model
        self.scorer = scorer

    async def rerank(self, request: RerankRequest) -> RerankResult:
        """One score per pair; InvalidRequestError names `{field}[i]` (or the field) at fault."""
        self._check_alive()
        if not request.pairs:
            raise InvalidRequestError(f"{request.field} must not be empty.", request.field)
        ids, types = await asyncio.to_thread(self._token_ids, request)
        return await self.submit(ids, types)

    def _limit(self, request: RerankRequest) -> int | None:
        """Tokens a pair is cut to (None: no cutting; too long is an error)."""
        k = request.truncate_prompt_tokens
        if k is None:
            return None
        if k == -1:
            return self.max_len
        if not 1 <= k <= self.max_len:
            raise InvalidRequestError(
                f"truncate_prompt_tokens must be -1 or between 1 and this model's maximum "
                f"length {self.max_len}, got {k}.",
                "truncate_prompt_tokens",
            )
        return k

    def _token_ids(self, request: RerankRequest) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids per pair (and token types, for a cross-encoder that has them)."""
        limit = self._limit(request)
        if self.scorer.kind == "cross_encoder":
            ids, types = self._pairs(request, limit)
        else:
            ids, types = [self._prompt(request, i, limit) for i in range(len(request.pairs))], None
        for i, row in enumerate(ids):
            if len(row) > self.max_len:
                raise InvalidRequestError(
                    f"{request.field}[{i}]: the pair has {len(row)} tokens; this model takes at "
                    f"most {self.max_len} (set truncate_prompt_tokens to cut it).",
                    request.field,
                )
        return ids, types

    def _pairs(
        self, request: RerankRequest, limit: int | None
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        """A cross-encoder's text pairs, cut longest-first as CrossEncoder does when asked."""
        queries = [query for query, _ in request.pairs]
        documents = [document for _, document in request.pairs]
        cut = {"truncation": "longest_first", "max_length": limit} if limit else {}
        encoded = self.tokenizer(queries, documents, **cut)
        if limit and any(len(row) > limit for row in encoded["input_ids"]):
            raise InvalidRequestError(
                f"truncate_prompt_tokens {limit} is shorter than the pairs' special tokens.",
                "truncate_prompt_tokens",
            )
        return encoded["input_ids"], encoded.get("token_type_ids")

    def _prompt(self, request: RerankRequest, i: int, limit: int | None) -> list[int]:
        """A decoder's prompt ids for pair i; cut (its document's last tokens) when asked."""
        text, start, end = self.scorer.render(*request.pairs[i])
        encoded = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=limit is not None
        )
        ids: list[int] = encoded["input_ids"]
        if limit is None or len(ids) <= limit:
            return ids
        in_document = [k for k, (a, b) in enumerate(encoded["offset_mapping"]) if start <= a < end]
        excess = len(ids) - limit
        if len(in_document) < excess:
            raise InvalidRequestError(
                f"{request.field}[{i}]: the prompt without its document has "
                f"{len(ids) - len(in_document)} tokens, more than truncate_prompt_tokens {limit}.",
                "truncate_prompt_tokens",
            )
        dropped = set(in_document[len(in_document) - excess :])
        return [t for k, t in enumerate(ids) if k not in dropped]

    # -- engine thread ------------------------------------------------------------------------
    def _forward_rows(self, bucket: list[tuple[Job, int]]) -> list[float]:
        rows = [job.ids[i] for job, i in bucket]
        if self.scorer.kind == "cross_encoder":
            ids, mask = padded(rows, self.pad_id)  # [B, T] each
            inputs = {"input_ids": ids, "attention_mask": mask}
            if bucket[0][0].extra is not None:  # token types: 0 for the query, 1 the document
                types, _ = padded([job.extra[i] for job, i in bucket], 0)  # [B, T]
                inputs["token_type_ids"] = types
            inputs = {name: tensor.to(self.device) for name, tensor in inputs.items()}
            logits = self.model(**inputs).logits  # [B, 1]
            return activate(logits, self.scorer.activation).cpu().tolist()
        ids, mask = padded(rows, self.pad_id, left=True)  # [B, T] each, last tokens at T - 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T] 0 at each row's first token
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
        )
        logits = out.logits[:, -1]  # [B, V] next-token logits after each prompt
        return answer_scores(logits, self.scorer.answer_ids).cpu().tolist()

    def _finish(self, job: Job) -> RerankResult:
        return RerankResult(list(job.outputs), sum(len(row) for row in job.ids))
