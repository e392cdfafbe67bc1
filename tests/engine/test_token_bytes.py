"""Each token's raw bytes, read from a real byte-level BPE tokenizer (SmolLM2's)."""

from __future__ import annotations

from hearth.engine.text.tokenizer import ChatTokenizer


def test_byte_level_bpe_tokens_map_back_to_their_raw_bytes(smollm_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = ChatTokenizer(AutoTokenizer.from_pretrained(smollm_tokenizer_dir))
    text = "Hi 😀 there, it's é"
    ids = tokenizer.hf(text, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.token_pieces(ids)
    assert b"".join(raw for raw, _ in pieces) == text.encode()
    assert not any(special for _, special in pieces)
    assert any(not raw.decode(errors="ignore") for raw, _ in pieces)  # a piece of the emoji
    end = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.token_pieces([end]) == [(b"<|im_end|>", True)]
