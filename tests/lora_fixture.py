"""PEFT adapters for the tiny models, and PEFT + transformers' own greedy outputs to compare."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# name -> (rank, target modules, use_rslora): several ranks and target modules
ADAPTERS = {
    "qv4": (4, ["q_proj", "v_proj"], False),
    "all8": (8, [*ATTENTION, "gate_proj", "up_proj", "down_proj"], False),
    "mlp16": (16, ["o_proj", "down_proj", "up_proj"], True),
    "kv2": (2, ["k_proj", "gate_proj"], False),
}


def build_adapter(base_dir: Path, out: Path, name: str, seed: int | None = None) -> Path:
    """A PEFT LoRA adapter with random A and B (init_lora_weights=False) saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rank, targets, rslora = ADAPTERS[name]
    torch.manual_seed(seed if seed is not None else sum(map(ord, name)))
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=targets,
        init_lora_weights=False,
        use_rslora=rslora,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # bigger deltas than PEFT's init: each adapter changes the output
        for param_name, param in peft_model.named_parameters():
            if "lora_" in param_name:
                param.mul_(3.0)
    peft_model.save_pretrained(out)
    return out


@functools.cache
def merged_model(base_dir: str, adapter_dir: str | None):
    """PEFT's merged model (or the plain base model for None), float32, eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    return model.eval()


def peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate() of PEFT's merged model: `n` new tokens."""
    model = merged_model(str(base_dir), None if adapter_dir is None else str(adapter_dir))
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()
