"""Building a model's engine: size the KV cache, wrap the tokenizer, start the engine thread.

`build_engine` serves a loaded model (rank 0); `follow` runs the other tensor-parallel ranks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from hearth.engine.async_engine import AsyncEngine
from hearth.engine.core import EngineCore
from hearth.engine.kv_cache import KVCacheSpec, budget_problem, num_kv_blocks
from hearth.engine.loading.loader import LoadedModel, LoadError, cpu_thread_count
from hearth.engine.multimodal.processor import VisionProcessor
from hearth.engine.runner import ModelRunner
from hearth.engine.spec_decode.build import make_speculator
from hearth.engine.text.tokenizer import ChatTokenizer
from hearth.engine.types import ModelInfo

log = logging.getLogger("hearth.engine")


def _kv_spec(loaded: LoadedModel) -> KVCacheSpec:
    """The KV cache's shape on this rank (ValueError: KV heads that do not split over ranks)."""
    return KVCacheSpec.from_model(loaded.model, loaded.dtype, loaded.config.tensor_parallel_size)


def fit_max_model_len(loaded: LoadedModel, num_blocks: int) -> int:
    """max_model_len capped to what the KV cache holds for one sequence (num_blocks x
    block_size tokens): a context the cache can never hold is not advertised. A max_model_len
    set in the config that does not fit is an error (LoadError, one line with both numbers);
    the model's own context length is capped with a warning."""
    capacity = num_blocks * loaded.config.engine.block_size
    if loaded.max_model_len <= capacity:
        return loaded.max_model_len
    if loaded.config.max_model_len is not None:
        raise LoadError(
            f"{loaded.config.id}: max_model_len {loaded.max_model_len} exceeds the KV cache's "
            f"{capacity} tokens: lower max_model_len or give the KV cache more memory "
            "(gpu_memory_utilization, kv_cache_memory)"
        )
    log.warning(
        "%s: max_model_len %d -> %d: the KV cache holds %d tokens (give it more memory for "
        "longer contexts: gpu_memory_utilization, kv_cache_memory)",
        loaded.config.id,
        loaded.max_model_len,
        capacity,
        capacity,
    )
    return capacity


def follow(loaded: LoadedModel) -> None:
    """A tensor-parallel rank other than 0: run rank 0's steps on this rank's shard until it
    shuts down (every rank sizes the same cache, so block ids mean the same everywhere)."""
    num_blocks = num_kv_blocks(_kv_spec(loaded), loaded.config.engine, loaded.device)
    runner = ModelRunner(
        loaded.model,
        num_blocks,
        loaded.dtype,
        loaded.config.engine,
        fit_max_model_len(loaded, num_blocks),
        loaded.config.tensor_parallel_size,
    )
    runner.follow()


def vision_processor(loaded: LoadedModel) -> VisionProcessor:
    """The processor facade of an image-text-to-text model (its image token, merge size)."""
    config = loaded.model.config
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = config.image_token_index
    merge = getattr(config.vision_config, "spatial_merge_size", 1)
    return VisionProcessor(loaded.processor, token, merge)


def build_engine(loaded: LoadedModel, draft: LoadedModel | None = None) -> AsyncEngine:
    """Size the KV cache (max_model_len capped to what it holds: `fit_max_model_len`), wrap the
    tokenizer, and start the engine thread. `draft`: the speculative draft model (method draft:
    engine/spec_decode/build.py's load_draft). Raises MemoryError (no KV memory) and LoadError."""
    settings = loaded.config.engine
    spec = _kv_spec(loaded)
    num_blocks = num_kv_blocks(spec, settings, loaded.device)
    if draft is not None:  # the budget holds a block of each model's per target block
        draft_bytes = KVCacheSpec.from_model(draft.model, draft.dtype, 1).bytes_per_token
        num_blocks = num_blocks * spec.bytes_per_token // (spec.bytes_per_token + draft_bytes)
    if num_blocks < 2:
        problem = budget_problem(settings, loaded.device)
        raise MemoryError(f"{loaded.config.id}: no memory for the KV cache ({problem})")
    max_model_len = fit_max_model_len(loaded, num_blocks)
    tokenizer = ChatTokenizer(loaded.tokenizer, getattr(loaded.model, "generation_config", None))
    tp_size = loaded.config.tensor_parallel_size
    on_cpu = loaded.device.type == "cpu"
    engine = AsyncEngine(
        tokenizer, loaded.config.id, pace=on_cpu, threads=cpu_thread_count() if on_cpu else 0
    )
    if loaded.processor is not None:
        engine.vision = vision_processor(loaded)
    try:
        vocab = loaded.model.config.get_text_config().vocab_size
        core = engine.start(
            lambda: EngineCore(
                loaded.model,
                tokenizer,
                settings,
                max_model_len,
                num_blocks,
                loaded.dtype,
                tp_size,
                make_speculator(loaded.config.speculative, draft, max_model_len, vocab, num_blocks),
            )
        )
    except ValueError as exc:  # an engine setting this model or machine cannot run: one line
        raise LoadError(f"{loaded.config.id}: {exc}") from None
    try:  # the engine thread runs already: it must not outlive a failed start
        log.info(
            "%s: KV cache %d tokens (%.2f GiB), %s",
            loaded.config.id,
            core.kv_capacity_tokens,
            core.kv_capacity_tokens * spec.bytes_per_token / 2**30,
            core.runner.kernels.describe(),
        )
        defaults = loaded.config.defaults.model_dump(exclude_none=True)
        vocab = getattr(loaded.tokenizer, "get_vocab", dict)()
        longest = max((len(token) for token in vocab), default=64)
        info = ModelInfo(
            model_id=loaded.config.id,
            source=loaded.config.source,
            max_model_len=max_model_len,
            device=loaded.devices,
            dtype=str(loaded.dtype).removeprefix("torch."),
            kv_capacity_tokens=core.kv_capacity_tokens,
            created=int(time.time()),
            aliases=list(loaded.config.aliases),
            default_sampling=defaults,
            max_token_chars=max(1, longest),
            tool_parser=tokenizer.tool_parser(loaded.config.tool_parser),
            template_tools=tokenizer.template_tools,
            reasoning_parser=tokenizer.reasoning_parser(loaded.config.reasoning_parser),
            vision=engine.vision is not None,
            document_start_id=document_start_id(loaded.tokenizer),
        )
        engine.info = info
    except BaseException:
        engine.shutdown()
        raise
    return engine


def document_start_id(tokenizer: Any) -> int | None:
    """BOS, else EOS (GPT-2's `<|endoftext|>` separates documents): where a document starts."""
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return None
