"""Loading a rerank model (`task: rerank`) and starting its engine thread.

A cross-encoder loads with `AutoModelForSequenceClassification`, a decoder reranker with
`AutoModelForCausalLM`; engine/rerank/scoring.py reads how each scores. The longest pair is the
model's context (`max_position_embeddings`), or models.yaml's `max_model_len` below it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from hearth.engine.batched.loading import context_length, load_error, model_info, open_checkpoint
from hearth.engine.config import ModelConfig
from hearth.engine.loading.loader import LoadError, cpu_thread_count
from hearth.engine.loading.sources import Source
from hearth.engine.rerank.engine import RerankEngine
from hearth.engine.rerank.scoring import RerankConfigError, read_scorer

log = logging.getLogger("hearth.engine")


def build_rerank_engine(
    config: ModelConfig, source: Source, base_dir: Path | None = None
) -> RerankEngine:
    """Load the weights, tokenizer and scoring of `config` and start its rerank thread."""
    device, dtype, path = open_checkpoint(config, source)
    trust = config.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
        scorer = read_scorer(path, hf_config, config.rerank, tokenizer)
        auto = AutoModelForSequenceClassification
        if scorer.kind == "decoder":
            auto = AutoModelForCausalLM  # type: ignore[assignment]
        model = auto.from_pretrained(path, dtype=dtype, trust_remote_code=trust, device_map=device)
    except RerankConfigError as exc:
        raise LoadError(f"{config.id}: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(config, exc) from None
    model.eval()
    context = context_length(hf_config)
    max_len = min(config.max_model_len or context, context)
    first_device = next(model.parameters()).device
    on_cpu = first_device.type == "cpu"
    engine = RerankEngine(
        model,
        tokenizer,
        scorer,
        config.engine,
        max_len,
        first_device,
        threads=cpu_thread_count() if on_cpu else 0,
        max_inputs=config.rerank.max_inputs,
    )
    engine.info = model_info(config, max_len, first_device, dtype)
    engine.start()
    is_cross = scorer.kind == "cross_encoder"
    detail = scorer.activation if is_cross else f"answer ids {scorer.answer_ids}"
    log.info(
        "%s: rerank model (%s, %s), max pair %d tokens, up to %d pairs per forward",
        config.id,
        scorer.kind,
        detail,
        max_len,
        config.engine.max_num_seqs,
    )
    return engine
