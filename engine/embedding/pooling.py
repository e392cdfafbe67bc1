"""Embedding models: their sentence-transformers pooling config, pooling itself, and loading.

A sentence-transformers checkpoint folder describes its pipeline in small JSON files, read here
without the sentence-transformers package (format as written by sentence-transformers 2.x-5.x):

- `modules.json`: `[{"idx": 0, "name": "0", "path": "", "type":
  "sentence_transformers.models.Transformer"}, {"idx": 1, "path": "1_Pooling", "type":
  "sentence_transformers.models.Pooling"}, {"idx": 2, "path": "2_Normalize", "type":
  "sentence_transformers.models.Normalize"}]`. A `Normalize` module means L2-normalised output.
- `<pooling path>/config.json`: `{"word_embedding_dimension": 384, "pooling_mode_cls_token":
  false, "pooling_mode_mean_tokens": true, "pooling_mode_max_tokens": false,
  "pooling_mode_mean_sqrt_len_tokens": false, "pooling_mode_weightedmean_tokens": false,
  "pooling_mode_lasttoken": false, "include_prompt": true}`: exactly one mode may be set here.
- `config_sentence_transformers.json`: `{"prompts": {"query": "Instruct: ...\\nQuery: "},
  "default_prompt_name": "query"}`: instruction prefixes, the default one put before every text.
- `sentence_bert_config.json`: `{"max_seq_length": 512}`: the longest input, in tokens.

Modules that change the vectors further (`Dense`, ...) are refused at load, as is a pooling mode
other than cls, mean and last token. A Matryoshka model's `dimensions` come from models.yaml
(`embedding.matryoshka_dimensions`) or `matryoshka_dimensions` in its config.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from hearth.engine.config import EmbeddingSettings

Pooling = Literal["cls", "mean", "last"]
_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


class PoolingConfigError(ValueError):
    """A pooling config hearth cannot follow; the message is one line."""


@dataclass
class PoolingConfig:
    """How hidden states become one vector per input."""

    mode: Pooling
    normalize: bool
    prompts: dict[str, str] = field(default_factory=dict)  # name -> prefix put before texts
    default_prompt_name: str | None = None
    max_seq_length: int | None = None  # tokens; None: the model's context
    matryoshka_dimensions: list[int] | None = None  # `dimensions` a request may ask for


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PoolingConfigError(f"cannot read {path.name}: {exc}") from None


def read_pooling_config(
    folder: str | Path, hf_config: Any, settings: EmbeddingSettings
) -> PoolingConfig:
    """The pooling of the checkpoint in `folder`, with models.yaml's `settings` over it."""
    folder = Path(folder)
    is_decoder = getattr(hf_config, "model_type", "") not in _ENCODERS
    mode: Pooling = "last" if is_decoder else "cls"
    normalize = True  # no sentence-transformers files: OpenAI-style unit vectors
    modules = _read_json(folder / "modules.json")
    if modules is not None:
        kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
        for kind in kinds:
            if kind not in _KNOWN_MODULES:
                raise PoolingConfigError(f"modules.json: module {kind!r} is not supported")
        normalize = False
        for kind, module in zip(kinds, modules, strict=True):
            if kind == "Normalize":
                normalize = True
            if kind == "Pooling":
                mode = _pooling_mode(folder / module.get("path", "1_Pooling") / "config.json")
    st_config = _read_json(folder / "config_sentence_transformers.json") or {}
    bert_config = _read_json(folder / "sentence_bert_config.json") or {}
    prompts = {str(k): str(v) for k, v in (st_config.get("prompts") or {}).items()}
    default_name = settings.default_prompt_name or st_config.get("default_prompt_name")
    if default_name is not None and default_name not in prompts:
        raise PoolingConfigError(f"default_prompt_name {default_name!r} is not in prompts")
    dims = settings.matryoshka_dimensions or getattr(hf_config, "matryoshka_dimensions", None)
    return PoolingConfig(
        mode=mode if settings.pooling == "auto" else settings.pooling,
        normalize=normalize if settings.normalize is None else settings.normalize,
        prompts=prompts,
        default_prompt_name=default_name,
        max_seq_length=bert_config.get("max_seq_length"),
        matryoshka_dimensions=sorted(int(d) for d in dims) if dims else None,
    )


_ENCODERS = {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "modernbert"}


def _pooling_mode(path: Path) -> Pooling:
    config = _read_json(path)
    if config is None:
        raise PoolingConfigError(f"modules.json names a Pooling module but {path} is missing")
    chosen = [name for name, value in config.items() if name.startswith("pooling_mode") and value]
    if len(chosen) != 1 or chosen[0] not in _MODES:
        raise PoolingConfigError(f"{path.parent.name}: pooling {chosen} is not supported")
    if config.get("include_prompt", True) is False:
        raise PoolingConfigError(f"{path.parent.name}: include_prompt false is not supported")
    return _MODES[chosen[0]]  # type: ignore[return-value]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: Pooling) -> torch.Tensor:
    """One float32 vector per row.

    hidden: [B, T, H] last hidden states of right-padded rows; mask: [B, T] 1 on real tokens.
    Returns [B, H]: the first token (cls), the mean over real tokens (mean) or the last real
    token (last; a causal model's padding after it does not change it).
    """
    hidden = hidden.float()  # [B, T, H]
    if mode == "cls":
        return hidden[:, 0]  # [B, H]
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, T, 1]
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)  # [B, H]
    last = mask.sum(1).long() - 1  # [B] index of each row's last real token
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]


def finish(vectors: torch.Tensor, normalize: bool, dimensions: int | None) -> torch.Tensor:
    """[B, H] pooled vectors -> [B, D]: truncated to `dimensions` (then always renormalised, as
    a Matryoshka model's shorter vectors are meant to be), else normalised if the model says."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]  # [B, D]
        normalize = True
    if normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2.0, dim=-1)
    return vectors
