"""The embeddings request, OpenAI's shape; unknown fields are accepted and ignored.

`input` is a string, a list of strings, a list of token ids or a list of lists of token ids
(OpenAI's four forms). `prompt_name` is hearth's (sentence-transformers'): which of the model's
instruction prefixes goes before text inputs (default: the model's `default_prompt_name`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from hearth.server.wire import WireModel


class EmbeddingRequest(WireModel):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    prompt_name: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: object) -> object:
        if value == [] or value == "":
            raise ValueError("input must not be empty")
        return value

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list of texts or a list of token-id lists."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], int):
            return [self.input]  # type: ignore[list-item]  # one input as token ids
        return self.input  # type: ignore[return-value]
