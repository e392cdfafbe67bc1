"""Tokenize / detokenize request models, vLLM's shapes; unknown fields are accepted and ignored.

vLLM takes `TokenizeCompletionRequest` (`prompt`) or `TokenizeChatRequest` (`messages`) on the
same path; here both are one model holding exactly one of the two, so that a bad field is a 400
naming it rather than a union's error. `add_special_tokens` keeps vLLM's defaults: true for a
prompt, false for messages (the chat template writes its own special tokens).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from hearth.server.chat.protocol import ChatMessage, ToolDef
from hearth.server.wire import ParamError, WireModel


class TokenizeRequest(WireModel):
    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages
    return_token_strs: bool = False
    # messages only
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[ToolDef] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            param = "prompt" if self.prompt is not None else "messages"
            raise ParamError(param, "exactly one of 'prompt' and 'messages' must be given")
        return self

    @property
    def special_tokens(self) -> bool:
        """add_special_tokens, or vLLM's default for this kind of request."""
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


class DetokenizeRequest(WireModel):
    model: str
    tokens: list[int]
