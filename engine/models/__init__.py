"""hearth's own model forwards (engine/models/llama.py: the Llama family); transformers'
modeling code, patched by engine/kernels/patching.py, runs every other architecture.

`own_forward` picks the path once per model and logs which one it is and why.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from hearth.engine.models import llama
from hearth.engine.models.llama import LlamaForward

__all__ = ["LlamaForward", "own_forward"]

log = logging.getLogger("hearth.engine")

# "transformers": always run transformers' modeling (comparisons, a suspected bug of ours)
ENV = "HEARTH_MODEL_FORWARD"


def own_forward(model: nn.Module, tp_size: int, max_positions: int) -> LlamaForward | None:
    """hearth's own forward for `model` (after prepare_model), or None where transformers'
    forward runs it: another architecture, tensor parallelism, device_map placement, weights
    not fused, or HEARTH_MODEL_FORWARD=transformers. Logs the path chosen."""
    kind = getattr(model.config, "model_type", "?")
    why = llama.problem(model, tp_size)
    if why is None and os.environ.get(ENV, "auto") == "transformers":
        why = f"{ENV}=transformers"
    if why is not None:
        log.info("model forward: transformers' %s modeling (%s)", kind, why)
        return None
    log.info("model forward: hearth's own (engine/models/llama.py, %s)", kind)
    return LlamaForward(model, max_positions)
