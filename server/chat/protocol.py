"""Chat completions request models (pydantic); unknown fields are accepted and ignored."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from hearth.server.chat.tool_turns import check_tool_turns
from hearth.server.content import Part, parts_text
from hearth.server.tools import call_json
from hearth.server.wire import (
    FunctionDef,
    ParamError,
    SamplingFields,
    WireModel,
    check_stream_options,
)


class _Request(WireModel):
    """Unknown fields are ignored; `null` on a field with a default means the default."""


class FunctionCall(_Request):
    name: str
    arguments: str = "{}"


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    """Any message OpenAI's chat API accepts, the deprecated `function` role and call included."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None  # deprecated: one call, before tool_calls
    tool_call_id: str | None = None
    # an assistant turn's thinking, sent back (both peers' names): templates that render it
    # (Qwen3's) get it as `reasoning_content`; the others ignore it
    reasoning_content: str | None = None
    reasoning: str | None = None

    def text(self) -> str:
        text = parts_text(self.content) if isinstance(self.content, list) else self.content or ""
        return text or self.refusal or ""

    def to_template(self) -> dict[str, Any]:
        """The dict chat templates expect: `developer` is rendered as `system`, the deprecated
        `function` role as `tool`, and a `function_call` as a tool call."""
        role = {"developer": "system", "function": "tool"}.get(self.role, self.role)
        message: dict[str, Any] = {"role": role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        calls = self.tool_calls or (
            [ToolCall(function=self.function_call)] if self.function_call else []
        )
        if calls:
            message["tool_calls"] = [
                call_json(c.id, c.function.name, c.function.arguments) for c in calls
            ]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        thinking = self.reasoning_content or self.reasoning
        if thinking and role == "assistant":
            message["reasoning_content"] = message["reasoning"] = thinking
        return message


class ToolDef(_Request):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ParamError("json_schema", "json_schema is required when type is 'json_schema'")
        return self


class AllowedTools(_Request):
    mode: Literal["auto", "required"]
    tools: list[NamedToolChoice] = Field(min_length=1)


class AllowedToolsChoice(_Request):
    """OpenAI's `allowed_tools`: calls restricted to the tools listed, in auto or required mode."""

    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools

    @property
    def names(self) -> list[str]:
        return [t.function.name for t in self.allowed_tools.tools]


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice | AllowedToolsChoice


class ChatCompletionRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # reasoning models (server/reasoning.py): OpenAI's effort; vLLM's template kwargs (e.g.
    # {"enable_thinking": false}); hearth's reasoning budget in tokens (0: close at once)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    max_reasoning_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs to be true")
        check_stream_options(self)
        check_tool_turns(self.messages)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None
