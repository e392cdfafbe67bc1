"""Tiny random embedding checkpoints with sentence-transformers files, and their reference
vectors computed with plain transformers + the same pooling (one unpadded forward per input).

- `build_tiny_bert`: a 2-layer BertModel (hidden 32) with a WordPiece tokenizer built here from a
  small vocabulary; modules.json + 1_Pooling (mean) + Normalize.
- `build_tiny_decoder_embedder`: a 2-layer Qwen2Model with SmolLM2's tokenizer; last-token
  pooling, Normalize, instruction prompts with a default, Matryoshka dimensions in config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (  # noqa: SIM905
    "the a of and to in is it that was for on are with as be at by this from or have an they "
    "which one you were her all she there would their we him been has when who will more no if "
    "out so said what up its about into than them can only other new some could time these two "
    "may then do first any my now such like our over man me even most made after also did many "
    "hearth fire embed vector model query document search"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'"
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
QUERY_PROMPT = "Instruct: find the passage\nQuery: "


def sample_texts(count: int = 64) -> list[str]:
    """`count` texts of varied lengths (1 to ~60 words), deterministic."""
    import random

    rng = random.Random(18)
    texts = []
    for i in range(count):
        n = 1 + (i * 7) % 23 + (40 if i % 16 == 5 else 0)
        texts.append(" ".join(rng.choice(WORDS) for _ in range(n)) + rng.choice([".", "!", "?"]))
    return texts


def _write_st_files(out: Path, mode: str, dim: int, prompts: dict | None, default: str | None):
    kinds = [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(kinds)
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "2_Normalize").mkdir(exist_ok=True)
    pooling = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": mode == "last",
        "include_prompt": True,
    }
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    st = {"prompts": prompts or {}, "default_prompt_name": default, "similarity_fn_name": "cosine"}
    (out / "config_sentence_transformers.json").write_text(json.dumps(st))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))


def _bert_tokenizer():
    """A WordPiece tokenizer over WORDS and single characters, BERT's pre/post-processing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = [*SPECIAL, *LETTERS, *(f"##{c}" for c in LETTERS), *WORDS]
    ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    backend = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = ids["[CLS]"], ids["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return BertTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_bert(
    out: Path,
    mode: str = "mean",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 64,
    max_positions: int = 128,
) -> Path:
    """A BERT-style encoder checkpoint with a sentence-transformers pooling config (tiny by
    default; bench/embed_bench.py builds a MiniLM-sized one)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    _bert_tokenizer().save_pretrained(out)
    tokenizer = BertTokenizerFast.from_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
    )
    BertModel(config).save_pretrained(out)
    _write_st_files(out, mode, hidden, None, None)
    return out


def build_tiny_decoder_embedder(out: Path, tokenizer_dir: Path) -> Path:
    """A Qwen2-style decoder embedder: last-token pooling, a default instruction prompt."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2Model

    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    config.matryoshka_dimensions = [16, 32, 64]
    Qwen2Model(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    prompts = {"query": QUERY_PROMPT, "document": ""}
    _write_st_files(out, "last", 64, prompts, "query")
    return out


def reference_vectors(folder: Path, inputs: list, mode: str, prefix: str = "") -> list[list[float]]:
    """transformers + pooling + L2 normalisation, one unpadded forward per input (texts get
    `prefix` and the tokenizer's special tokens; token-id lists are used as they are)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vectors = []
    with torch.inference_mode():
        for item in inputs:
            ids = tokenizer(prefix + item)["input_ids"] if isinstance(item, str) else item
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [T, H]
            pooled = {"cls": hidden[0], "mean": hidden.mean(0), "last": hidden[-1]}[mode]
            vectors.append(torch.nn.functional.normalize(pooled, dim=-1).tolist())
    return vectors


def cosine(a: list[float], b: list[float]) -> float:
    import math

    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
