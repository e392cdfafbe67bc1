"""Legacy text completions request model (pydantic); unknown fields are accepted and ignored."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from hearth.server.wire import ParamError, SamplingFields, check_stream_options


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: score the prompt
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:  # no prompt at all; "" (any shape) starts a
            raise ValueError("prompt must not be empty")  # document (serving.py)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        check_stream_options(self)
        if self.max_tokens == 0 and not self.echo:
            message = "max_tokens must be at least 1 (0 only with echo, to score the prompt)"
            raise ParamError("max_tokens", message)
        return self

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """Alternatives the engine computes per prompt token: for echo with logprobs (the
        prompt's logprobs lead the choice's) and for vLLM's prompt_logprobs; None: neither."""
        asked = [self.prompt_logprobs]
        if self.echo:
            asked.append(self.logprobs)
        asked = [k for k in asked if k is not None]
        return max(asked) if asked else None

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of texts or token-id lists, one per prompt."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)
