"""Reading and checking a PEFT LoRA adapter directory, without PEFT.

The format is PEFT's `save_pretrained` output (peft/utils/save_and_load.py,
peft/tuners/lora/config.py):

- `adapter_config.json`: `peft_type: "LORA"`, `r`, `lora_alpha`, `target_modules` (names or a
  regex string), `use_rslora` (scale alpha / sqrt(r) instead of alpha / r), `use_dora`, `bias`,
  `fan_in_fan_out`, `modules_to_save`, `rank_pattern`, `alpha_pattern`,
  `base_model_name_or_path`.
- `adapter_model.safetensors` (or `adapter_model.bin`): for each adapted module,
  `base_model.model.<module path>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].

A module `<path>` of the served causal LM (its `named_modules()` names) then computes
`base(x) + scale * (x @ A^T) @ B^T`. Everything that hearth cannot serve exactly (DoRA, trained
biases, modules_to_save, embeddings, lm_head, per-module alpha) is refused with an AdapterError
naming the adapter, before anything is copied to the device.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hearth.engine.types import InvalidRequestError

_PREFIX = "base_model.model."


class AdapterError(InvalidRequestError):
    """An adapter that cannot be served: missing, unreadable, or not fitting the model (400)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"LoRA adapter {name!r}: {problem}", "lora_path")


@dataclass
class LoraWeights:
    """One adapter's weights on the host, ready to copy into a slot.

    `modules`: module path -> (A [r, in], B [out, r] already multiplied by the scale), float32.
    """

    name: str
    path: str
    rank: int
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def resolve_adapter_dir(name: str, source: str, base_dir: Path | None = None) -> Path:
    """A local directory, or a hub id already in the local Hugging Face cache (no download)."""
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterError(name, f"{source} is not a directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception:
        raise AdapterError(
            name, f"{source} is neither a directory nor a hub id in the local cache"
        ) from None


def _read_config(name: str, folder: Path) -> dict:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except FileNotFoundError:
        raise AdapterError(name, f"no adapter_config.json in {folder}") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(name, f"cannot read adapter_config.json: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(name, "adapter_config.json is not a PEFT LoRA config")
    refused = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save (fully trained modules) are not supported",
        "alpha_pattern": "per-module lora_alpha (alpha_pattern) is not supported",
        "fan_in_fan_out": "fan_in_fan_out (Conv1D layers) is not supported",
    }
    for key, problem in refused.items():
        if config.get(key):
            raise AdapterError(name, problem)
    if config.get("bias", "none") != "none":
        raise AdapterError(name, "trained biases (bias != 'none') are not supported")
    return config


def _read_tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    safetensors, pickled = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    try:
        if safetensors.exists():
            from safetensors.torch import load_file

            return load_file(str(safetensors))
        if pickled.exists():
            return torch.load(str(pickled), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(name, f"cannot read the adapter weights: {exc}") from None
    raise AdapterError(name, f"no adapter_model.safetensors in {folder}")


def read_adapter(
    name: str, source: str, model: nn.Module, max_rank: int, base_dir: Path | None = None
) -> LoraWeights:
    """Read adapter `name` from `source` and check it against `model` (the served causal LM).

    Raises AdapterError (a 400 / one-line start-up error) when the directory or its files are
    missing or unreadable, the rank exceeds `max_rank`, a target module is not a linear layer of
    the model's decoder (absent, embedding, lm_head), or a weight's shape does not match the
    model's layer (an adapter trained for another base model).
    """
    folder = resolve_adapter_dir(name, source, base_dir)
    config = _read_config(name, folder)
    tensors = _read_tensors(name, folder)
    layers = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
        if match is None:
            raise AdapterError(name, f"unexpected tensor {key!r} (not a LoRA A/B weight)")
        pairs.setdefault(match.group(1).removeprefix(_PREFIX), {})[match.group(2)] = tensor
    if not pairs:
        raise AdapterError(name, "the adapter has no LoRA weights")
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    weights = LoraWeights(name, str(folder), 0)
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(name, f"{path}: lora_A and lora_B must both be present")
        layer = layers.get(path)
        if layer is None:
            short = path.rsplit(".", 1)[-1]
            raise AdapterError(name, f"target module {short!r} ({path}) is not in the model")
        if path.rsplit(".", 1)[-1] == "lm_head" or not hasattr(layer, "in_features"):
            raise AdapterError(name, f"target module {path} is not a decoder linear layer")
        a, b = ab["A"].float(), ab["B"].float()  # [r, in], [out, r]
        rank = a.shape[0]
        if rank > max_rank:
            raise AdapterError(name, f"rank {rank} exceeds max_lora_rank {max_rank}")
        want_a, want_b = (rank, layer.in_features), (layer.out_features, rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise AdapterError(
                name,
                f"{path}: weights {list(a.shape)} / {list(b.shape)} do not fit the layer "
                f"[{layer.out_features}, {layer.in_features}]: trained for another base model?",
            )
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        weights.modules[path] = (a.contiguous(), (b * scale).contiguous())
        weights.rank = max(weights.rank, rank)
    return weights
