"""Logprobs exact to the byte: strings and bytes from raw token bytes, aligned with the text."""

from __future__ import annotations

from hearth.engine.types import TokenLogprob
from hearth.server.logprobs import (
    LogprobAligner,
    aligned,
    chat_logprobs,
    completion_logprobs,
    token_string,
)
from tests.fixtures.fakes import FakeEngine

EOS = 300  # FakeEngine: ids from 256 up are special tokens, shown as <|id|>


def entries(ids: list[int], top: int = 0) -> list[TokenLogprob]:
    return [TokenLogprob(t, -0.5, [(t + k, -0.5 - k) for k in range(top)]) for t in ids]


def test_token_strings_escape_partial_utf8_and_keep_special_text() -> None:
    assert token_string(b" there") == " there"
    assert token_string(b"\xf0\x9f\x98") == "bytes:\\xf0\\x9f\\x98"
    assert token_string(b"<|im_end|>", special=True) == "<|im_end|>"


def test_emoji_bytes_concatenate_to_the_utf8_of_the_content() -> None:
    engine, text = FakeEngine(), "ok 😀!"
    ids = list(text.encode())
    content = chat_logprobs(engine, aligned(engine, text, entries(ids), "length"))["content"]
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode()
    assert [c["token"] for c in content][3:7] == [
        "bytes:\\xf0",
        "bytes:\\x9f",
        "bytes:\\x98",
        "bytes:\\x80",
    ]
    assert "\ufffd" not in str(content)


def test_top_logprobs_keep_alternatives_that_would_collide_as_replacement_chars() -> None:
    engine = FakeEngine()
    text = "é"  # two byte-tokens, neither valid UTF-8 alone
    result = completion_logprobs(
        engine, aligned(engine, text, entries(list(text.encode()), 5), "length")
    )
    assert [len(top) for top in result["top_logprobs"]] == [5, 5]
    assert result["text_offset"] == [0, 0]  # both bytes are of the first character
    assert max(result["text_offset"]) <= len(text)


def test_offsets_count_characters_after_the_echo() -> None:
    engine = FakeEngine()
    result = completion_logprobs(
        engine, aligned(engine, "a😀b", entries(list("a😀b".encode())), "length", offset=3)
    )
    assert result["text_offset"] == [3, 4, 4, 4, 4, 5]  # the emoji's bytes all start at 4


def test_stop_string_tokens_and_the_stop_token_are_not_listed() -> None:
    engine = FakeEngine()
    # generated "7, 8" then EOS; the stop string " 8" cut the text to "7,"
    placed = aligned(engine, "7,", entries([*b"7, 8", EOS]), "stop")
    assert [token_string(a.raw) for a in placed] == ["7", ","]
    # ended by EOS: the text is all there, the EOS is not listed
    placed = aligned(engine, "hi", entries([*b"hi", EOS]), "stop")
    assert [a.raw for a in placed] == [b"h", b"i"]


def test_legacy_completions_list_the_stop_token_last_but_never_a_stop_string() -> None:
    engine = FakeEngine()
    placed = aligned(engine, "hi", entries([*b"hi", EOS]), "stop", offset=4, keep_stop_token=True)
    shown = completion_logprobs(engine, placed)
    assert shown["tokens"] == ["h", "i", f"<|{EOS}|>"] and shown["text_offset"] == [4, 5, 6]
    placed = aligned(engine, "7,", entries([*b"7, 8"]), "stop", keep_stop_token=True)
    assert [a.raw for a in placed] == [b"7", b","]
    streamed = LogprobAligner(engine, keep_stop_token=True)
    assert [a.raw for a in streamed.feed("hi", entries([*b"hi"]))] == [b"h", b"i"]
    assert [a.raw for a in streamed.feed("", entries([EOS]), "stop")] == [f"<|{EOS}|>".encode()]


def test_streamed_logprobs_wait_for_their_text_and_stop_drops_the_rest() -> None:
    engine, aligner = FakeEngine(), None
    aligner = LogprobAligner(engine)
    assert [a.raw for a in aligner.feed("7", entries([*b"7"]))] == [b"7"]
    assert [a.raw for a in aligner.feed(",", entries([*b","]))] == [b","]
    assert aligner.feed("", entries([*b" "])) == []  # held back: could start the stop string
    assert aligner.feed("", entries([*b"8"]), "stop") == []  # it did: " 8" is not listed


def test_special_tokens_mid_text_are_listed_with_their_text() -> None:
    engine = FakeEngine()
    placed = aligned(engine, "ab", entries([*b"a", EOS, *b"b", EOS]), "length")
    shown = [token_string(a.raw, a.special) for a in placed]
    assert shown == ["a", f"<|{EOS}|>", "b", f"<|{EOS}|>"]
    assert [a.offset for a in placed] == [0, 1, 1, 2]


def test_sentencepiece_tokens_map_spaces_and_byte_fallbacks() -> None:
    from hearth.engine.text.token_bytes import TokenBytes

    class Piece:  # a SentencePiece-style vocabulary: ▁ for spaces, <0xNN> byte fallbacks
        all_special_ids = [2]
        added_tokens_decoder: dict = {}

        def convert_ids_to_tokens(self, token_id: int) -> str:
            return {0: "\u2581Hi", 1: "<0xE2>", 2: "</s>"}[token_id]

    pieces = TokenBytes(Piece()).pieces([0, 1, 2])
    assert pieces == [(b" Hi", False), (b"\xe2", False), (b"</s>", True)]
