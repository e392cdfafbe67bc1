"""A model's speculative decoding from its models.yaml `speculative` entry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hearth.engine.config import ModelConfig, SpeculativeConfig
from hearth.engine.loading.loader import LoadedModel, load_model
from hearth.engine.loading.sources import resolve_source
from hearth.engine.spec_decode.ngram import NgramProposer
from hearth.engine.spec_decode.speculator import Speculator


def load_draft(config: ModelConfig, base_dir: Path | None = None) -> LoadedModel | None:
    """The draft model of `config` (method: draft), on the target's device; else None."""
    spec = config.speculative
    if spec is None or spec.method != "draft" or spec.draft is None:
        return None
    draft = ModelConfig(
        id=f"{config.id} (draft)",
        source=spec.draft,
        device=config.device,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        engine=config.engine,
    )
    return load_model(draft, resolve_source(spec.draft, base_dir), base_dir=base_dir)


def make_speculator(
    spec: SpeculativeConfig | None,
    draft: LoadedModel | None,
    max_model_len: int,
    vocab_size: int,
    num_blocks: int,
) -> Speculator | None:
    """The Speculator for `spec` (None: no speculative decoding). A draft model gets its own
    KV cache of `num_blocks` blocks, as many as the target's (the engine's KV budget is split
    between the two: engine/builder.py). Call on the engine thread (it builds a runner)."""
    if spec is None:
        return None
    proposer: Any
    if spec.method == "ngram":
        proposer = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
    else:
        if draft is None:
            raise ValueError("speculative method draft: the draft model is not loaded")
        from hearth.engine.spec_decode.draft import DraftProposer

        settings = draft.config.engine
        proposer = DraftProposer(
            draft.model, num_blocks, draft.dtype, settings, max_model_len, vocab_size
        )
    return Speculator(proposer, spec.num_speculative_tokens, spec.max_batch)
