"""The rerank and score requests, in the shapes vLLM serves; unknown fields are ignored.

- Rerank (Cohere v1/v2, Jina): `query`, `documents` (strings, or objects with `text`), `top_n`
  (0 or absent: all), `return_documents` (default true, as vLLM and Jina return them).
- Score (vLLM): `text_1` and `text_2`, each a string or a list of strings: one to one, one to
  many (a single `text_1` against every `text_2`) or many to many (pairwise, equal lengths).

`truncate_prompt_tokens` (vLLM's): absent: a pair longer than the model takes is a 400 naming
it; k: each pair is cut to k tokens; -1: to the model's length.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from hearth.server.wire import WireModel


class RerankDocument(WireModel):
    text: str


class RerankRequest(WireModel):
    model: str
    query: str
    documents: list[str | RerankDocument]
    top_n: int | None = Field(None, ge=0)
    return_documents: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=-1)

    @field_validator("documents")
    @classmethod
    def _not_empty(cls, value: list[object]) -> list[object]:
        if not value:
            raise ValueError("documents must not be empty")
        return value

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(WireModel):
    model: str
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = Field(None, ge=-1)

    @field_validator("text_1", "text_2")
    @classmethod
    def _not_empty(cls, value: str | list[str]) -> str | list[str]:
        if value == []:
            raise ValueError("must not be an empty list")
        return value
