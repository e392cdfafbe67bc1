"""Loading an embedding model (`task: embed`) and starting its engine thread.

The checkpoint's base model is loaded with `AutoModel` (an encoder such as BertModel, or a
decoder's base model such as Qwen2Model / LlamaModel, also from a `*ForCausalLM` checkpoint),
its pooling read the sentence-transformers way (engine/embedding/pooling.py). A GGUF source is
converted once to a safetensors checkpoint (engine/loading/gguf_cache.py), as for generation, and
then pooled as a decoder without sentence-transformers files: last token, normalised.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoTokenizer

from hearth.engine.batched.loading import context_length, load_error, model_info, open_checkpoint
from hearth.engine.config import ModelConfig
from hearth.engine.embedding.engine import EmbeddingEngine
from hearth.engine.embedding.pooling import PoolingConfigError, read_pooling_config
from hearth.engine.loading.loader import LoadError, cpu_thread_count
from hearth.engine.loading.sources import Source

log = logging.getLogger("hearth.engine")


def build_embedding_engine(
    config: ModelConfig, source: Source, base_dir: Path | None = None
) -> EmbeddingEngine:
    """Load the weights, tokenizer and pooling of `config` and start its embedding thread."""
    device, dtype, path = open_checkpoint(config, source)
    trust = config.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
        pooling = read_pooling_config(path, hf_config, config.embedding)
        model = AutoModel.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust, device_map=device
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except PoolingConfigError as exc:
        raise LoadError(f"{config.id}: {exc}") from None
    except (OSError, ValueError, KeyError) as exc:
        raise load_error(config, exc) from None
    model.eval()
    context = context_length(hf_config)
    max_len = min(config.max_model_len or pooling.max_seq_length or context, context)
    first_device = next(model.parameters()).device
    on_cpu = first_device.type == "cpu"
    engine = EmbeddingEngine(
        model,
        tokenizer,
        pooling,
        config.engine,
        max_len,
        first_device,
        threads=cpu_thread_count() if on_cpu else 0,
        max_inputs=config.embedding.max_inputs,
    )
    engine.info = model_info(config, max_len, first_device, dtype)
    engine.start()
    log.info(
        "%s: embedding model, %s pooling%s, max input %d tokens, up to %d inputs per forward",
        config.id,
        pooling.mode,
        ", normalized" if pooling.normalize else "",
        max_len,
        config.engine.max_num_seqs,
    )
    return engine
