"""Legacy text completions request model (pydantic); unknown fields are accepted and ignored."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from hearth.server.wire import SamplingFields, check_stream_options


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(v in ("", []) for v in value)):
            raise ValueError("prompt must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        check_stream_options(self)
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists, one per prompt."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)
