"""N-gram proposer (prompt lookup decoding): continue the last n tokens as they continued before.

No model: the request's own prompt and output are searched for the latest earlier occurrence of
their last n tokens (n from `max_n` down to `min_n`), and the tokens that followed it are
proposed. It pays where the output repeats its input: editing code, extraction, quoting.
"""

from __future__ import annotations

from hearth.engine.sequence import Sequence
from hearth.engine.spec_decode.proposer import Proposal


def lookup(tokens: list[int], num: int, min_n: int, max_n: int) -> list[int]:
    """Up to `num` tokens that followed the latest earlier occurrence of the last n tokens of
    `tokens` (the longest n in [min_n, max_n] that occurs); [] when none does."""
    length = len(tokens)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        suffix, last = tokens[length - n :], tokens[-1]
        for end in range(length - 2, n - 2, -1):  # end: the last index of an earlier match
            if tokens[end] == last and tokens[end - n + 1 : end + 1] == suffix:
                return tokens[end + 1 : end + 1 + num]
    return []


class NgramProposer:
    """Prompt lookup over each sequence's own tokens (deterministic: q is one-hot)."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[Proposal]:
        return [
            Proposal(lookup(seq.token_ids(), num, self.min_n, self.max_n))
            for seq, num in zip(seqs, num_tokens, strict=True)
        ]
