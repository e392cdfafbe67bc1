"""Incremental detokenizer: whole characters, no partial stop strings, deltas add up."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from hearth.engine.text.detokenizer import IncrementalDetokenizer


def byte_decode(ids: Sequence[int]) -> str:
    """A byte-level 'tokenizer': each id is one byte."""
    return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stop: Sequence[str] = (), chunk: int = 1) -> tuple[list[str], str, bool]:
    detok = IncrementalDetokenizer(byte_decode, stop)
    data = list(text.encode())
    deltas = [detok.push(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    if not detok.stopped:
        deltas.append(detok.finish())
    return deltas, detok.text, detok.stopped


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 end", "plain"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_deltas_are_whole_characters_and_add_up(text: str, chunk: int) -> None:
    deltas, final, stopped = stream(text, chunk=chunk)
    assert not stopped
    assert "".join(deltas) == final == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_never_emitted_even_in_part() -> None:
    deltas, final, stopped = stream("The answer is 42.\nEND of it", stop=["\nEND"])
    assert stopped
    assert final == "The answer is 42."
    assert "".join(deltas) == final
    assert not any("\n" in d for d in deltas)


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    deltas, final, stopped = stream("a STOx b", stop=["STOP"])
    assert not stopped and "".join(deltas) == final == "a STOx b"
    detok = IncrementalDetokenizer(byte_decode, ["STOP"])
    assert detok.push(list(b"abc ST")) == "abc "  # "ST" might start "STOP"
    assert detok.finish() == "ST"  # the sequence ended: nothing is a stop any more


def test_earliest_of_several_stops_wins() -> None:
    _, final, stopped = stream("one two three", stop=["three", "two"])
    assert stopped and final == "one "


def test_stop_across_multibyte_characters() -> None:
    deltas, final, stopped = stream("añb§c", stop=["§"])
    assert stopped and final == "añb" and "".join(deltas) == final


def test_real_tokenizer_round_trip(smollm_tokenizer_dir) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    text = "Grüße aus Köln! 東京 🎉 — “quotes” and spaces  twice.\nNew line."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(lambda t: tokenizer.decode(t, skip_special_tokens=True))
    deltas = [detok.push([i]) for i in ids] + [detok.finish()]
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
