"""How a rerank model turns a (query, document) pair into one relevance score.

Two kinds, told apart by the checkpoint's architecture:

- **cross-encoder** (`*ForSequenceClassification`, one label): the pair is tokenized as a text
  pair (`[CLS] query [SEP] document [SEP]` with token types for BERT) and the score is the
  activation of its one logit, as sentence-transformers' `CrossEncoder.predict` computes it
  (sentence-transformers 6.3, `cross_encoder/model.py`): the first activation named by
  `config_sentence_transformers.json` (`"activation_fn": "torch.nn.modules.activation.Sigmoid"`,
  v6), config.json's `sentence_transformers.activation_fn` (v4-5) or its
  `sbert_ce_default_activation_function` (v2-3), else Sigmoid for one label; as there, a name
  outside `torch.` is not trusted and gives the default. More labels give no single relevance
  score and are refused.
- **decoder** (`*ForCausalLM`): the pair is written into a prompt template and the score is the
  probability of the positive answer token against the negative one at the next position:
  `exp(log_softmax([logit(no), logit(yes)])[1])`, as Qwen3-Reranker's model card computes it. The
  template comes from models.yaml (`rerank.template`, or the preset `qwen3`), else `qwen3` for a
  Qwen3 checkpoint; the answer tokens from `rerank.answer_tokens`, else config.json's
  `classifier_from_token` (vLLM's key), else the preset's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from hearth.engine.config import RerankSettings

QWEN3_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
    'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
PRESETS = {  # name -> (template, default instruction, [negative, positive] answer tokens)
    "qwen3": (
        QWEN3_TEMPLATE,
        "Given a web search query, retrieve relevant passages that answer the query",
        ["no", "yes"],
    ),
}
_FIELD = re.compile(r"\{(query|document|instruction)\}")
Activation = Literal["sigmoid", "identity", "tanh"]
_ACTIVATIONS = {"Sigmoid": "sigmoid", "Identity": "identity", "Tanh": "tanh"}


class RerankConfigError(ValueError):
    """A rerank config hearth cannot follow; the message is one line."""


@dataclass
class Scorer:
    """What the engine needs to score pairs: the kind and its parameters."""

    kind: Literal["cross_encoder", "decoder"]
    activation: Activation = "sigmoid"  # cross-encoders
    template: str = ""  # decoders: with {query}, {document} (once) and maybe {instruction}
    instruction: str = ""
    answer_ids: tuple[int, int] = (0, 0)  # decoders: (negative, positive) token ids

    def render(self, query: str, document: str) -> tuple[str, int, int]:
        """A decoder's prompt for the pair and the [start, end) characters of the document in
        it. Fields are filled in one pass: braces in the texts stay as they are."""
        values = {"query": query, "document": document, "instruction": self.instruction}
        parts: list[str] = []
        at = length = start = 0
        for match in _FIELD.finditer(self.template):
            parts.append(self.template[at : match.start()])
            length += match.start() - at
            if match.group(1) == "document":
                start = length
            parts.append(values[match.group(1)])
            length += len(values[match.group(1)])
            at = match.end()
        parts.append(self.template[at:])
        return "".join(parts), start, start + len(document)


def read_scorer(
    folder: str | Path, hf_config: Any, settings: RerankSettings, tokenizer: Any
) -> Scorer:
    """The scoring of the checkpoint in `folder` (its config `hf_config`), models.yaml's
    `settings` over it; RerankConfigError when it cannot be followed."""
    architectures = getattr(hf_config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return _cross_encoder(Path(folder), hf_config, settings)
    if any(a.endswith("ForCausalLM") for a in architectures):
        return _decoder(hf_config, settings, tokenizer)
    raise RerankConfigError(
        f"architectures {architectures}: a reranker is a *ForSequenceClassification "
        "(cross-encoder) or *ForCausalLM (decoder reranker) checkpoint"
    )


def _cross_encoder(folder: Path, hf_config: Any, settings: RerankSettings) -> Scorer:
    labels = getattr(hf_config, "num_labels", 1)
    if labels != 1:
        raise RerankConfigError(f"the classifier has {labels} labels; a reranker has 1")
    modules = _read_json(folder / "modules.json") or [{}]
    if len(modules) > 1:
        kinds = [str(module.get("type", "")).rsplit(".", 1)[-1] for module in modules]
        raise RerankConfigError(f"modules.json: modules {kinds[1:]} are not supported")
    activation = settings.activation
    if activation == "auto":
        activation = _named_activation(folder) or "sigmoid"  # CrossEncoder's for one label
    return Scorer("cross_encoder", activation=activation)  # type: ignore[arg-type]


def _named_activation(folder: Path) -> Activation | None:
    """The activation the checkpoint names, where CrossEncoder looks for it, in its order."""
    st_config = _read_json(folder / "config_sentence_transformers.json") or {}
    raw = _read_json(folder / "config.json") or {}
    for named in (
        st_config.get("activation_fn"),
        (raw.get("sentence_transformers") or {}).get("activation_fn"),
        raw.get("sbert_ce_default_activation_function"),
    ):
        if not named:
            continue
        if not str(named).startswith("torch."):
            return None  # not trusted by CrossEncoder either: its default
        name = str(named).rsplit(".", 1)[-1]
        if name not in _ACTIVATIONS:
            raise RerankConfigError(f"activation {named!r} is not supported")
        return _ACTIVATIONS[name]  # type: ignore[return-value]
    return None


def _decoder(hf_config: Any, settings: RerankSettings, tokenizer: Any) -> Scorer:
    template = settings.template
    if template is None and getattr(hf_config, "model_type", "") == "qwen3":
        template = "qwen3"
    if template is None:
        raise RerankConfigError(
            "a decoder reranker needs rerank.template (a prompt with {query} and {document}, "
            f"or one of: {', '.join(PRESETS)})"
        )
    preset = PRESETS.get(template)
    instruction, tokens = (preset[1], preset[2]) if preset else ("", None)
    template = preset[0] if preset else template
    fields = _FIELD.findall(template)
    if fields.count("document") != 1 or "query" not in fields:
        raise RerankConfigError("rerank.template needs {query} and exactly one {document}")
    tokens = settings.answer_tokens or getattr(hf_config, "classifier_from_token", None) or tokens
    if not tokens or len(tokens) != 2:
        raise RerankConfigError("a decoder reranker needs answer_tokens [negative, positive]")
    ids = [_one_token(tokenizer, token) for token in tokens]
    return Scorer(
        "decoder",
        template=template,
        instruction=settings.instruction if settings.instruction is not None else instruction,
        answer_ids=(ids[0], ids[1]),
    )


def _one_token(tokenizer: Any, token: str) -> int:
    """The id of `token` as one vocabulary entry (or as text that encodes to one token)."""
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise RerankConfigError(f"answer token {token!r} is {len(ids)} tokens, not one")
    return int(ids[0])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RerankConfigError(f"cannot read {path.name}: {exc}") from None


def activate(logits: torch.Tensor, activation: Activation) -> torch.Tensor:
    """A cross-encoder's scores: logits [B, 1] -> [B] float32 through the activation."""
    logits = logits.float()[:, 0]  # [B]
    if activation == "sigmoid":
        return torch.sigmoid(logits)
    if activation == "tanh":
        return torch.tanh(logits)
    return logits


def answer_scores(logits: torch.Tensor, answer_ids: tuple[int, int]) -> torch.Tensor:
    """A decoder reranker's scores: next-token logits [B, V] -> [B] float32, the positive
    token's probability under a softmax over (negative, positive) only."""
    pair = logits[:, list(answer_ids)].float()  # [B, 2]
    return torch.log_softmax(pair, dim=-1)[:, 1].exp()  # [B]
