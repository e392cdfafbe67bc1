"""Anthropic Messages API request models (pydantic): `POST /v1/messages` and its count_tokens.

Shapes from Anthropic's API reference (docs.anthropic.com, "Messages"): content blocks `text`,
`image` (base64 or url source), `tool_use`, `tool_result` (string or block content, `is_error`),
`thinking` / `redacted_thinking` sent back; `system` as a string or text blocks; custom `tools`
(`name`, `description`, `input_schema`); `tool_choice` auto / any / tool / none. Unknown fields
(`cache_control`, `citations`, ...) are accepted and ignored, as on the OpenAI routes.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from hearth.engine.types import SamplingParams
from hearth.server.limits import MAX_STOP_CHARS
from hearth.server.wire import ParamError, WireModel


class TextBlock(WireModel):
    type: Literal["text"] = "text"
    text: str


class Base64Source(WireModel):
    type: Literal["base64"]
    media_type: str
    data: str


class URLSource(WireModel):
    type: Literal["url"]
    url: str


class ImageBlock(WireModel):
    type: Literal["image"]
    source: Annotated[Base64Source | URLSource, Field(discriminator="type")]

    @property
    def url(self) -> str:
        """The image as a URL server/images.py reads (`data:` for base64 sources)."""
        source = self.source
        if isinstance(source, URLSource):
            return source.url
        return f"data:{source.media_type};base64,{source.data}"


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


ResultPart = Annotated[TextBlock | ImageBlock, Field(discriminator="type")]


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ResultPart] = ""
    is_error: bool = False

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if isinstance(p, TextBlock))


class ThinkingBlock(WireModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(WireModel):
    type: Literal["redacted_thinking"]
    data: str = ""


# Capitalised tags: error locations leave them out (messages[0].content[1].text).
_TAGS = {
    "text": "Text",
    "image": "Image",
    "tool_use": "ToolUse",
    "tool_result": "ToolResult",
    "thinking": "Thinking",
    "redacted_thinking": "Redacted",
}


def _block_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _TAGS.get(kind) if isinstance(kind, str) else None


Block = Annotated[
    Annotated[TextBlock, Tag("Text")]
    | Annotated[ImageBlock, Tag("Image")]
    | Annotated[ToolUseBlock, Tag("ToolUse")]
    | Annotated[ToolResultBlock, Tag("ToolResult")]
    | Annotated[ThinkingBlock, Tag("Thinking")]
    | Annotated[RedactedThinkingBlock, Tag("Redacted")],
    Discriminator(
        _block_tag,
        custom_error_type="invalid_content_block",
        custom_error_message="content blocks must be of type text, image, tool_use, "
        "tool_result, thinking or redacted_thinking",
    ),
]


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDef(WireModel):
    """A client tool. Anthropic's server tools (web search, code execution, ...) are not run
    here: a tool with another `type` is a 400 naming it."""

    type: str | None = None  # "custom" or absent
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,128}$")
    description: str | None = None
    input_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _custom(self) -> ToolDef:
        if self.type not in (None, "custom"):
            raise ParamError("type", f"tools of type '{self.type}' are not supported by hearth")
        if self.input_schema is None:
            raise ParamError("input_schema", "input_schema is required")
        return self


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ParamError("name", "name is required when type is 'tool'")
        return self


class Thinking(WireModel):
    """`enabled` with a budget; `adaptive` and `between_tools` (the model decides how much):
    thinking on, no budget; `disabled`."""

    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _budget(self) -> Thinking:
        if self.type == "enabled" and self.budget_tokens is None:
            raise ParamError("budget_tokens", "budget_tokens is required when type is 'enabled'")
        return self


class Conversation(WireModel):
    """What count_tokens reads: the turn as the model would see it."""

    model: str
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None

    def system_text(self) -> str | None:
        if isinstance(self.system, list):
            return "\n\n".join(block.text for block in self.system) or None
        return self.system or None


class MessagesRequest(Conversation):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)  # Anthropic's range is [0, 1]
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    metadata: dict[str, Any] | None = None  # user_id: accepted, not used

    @field_validator("stop_sequences")
    @classmethod
    def _stop_length(cls, value: list[str] | None) -> list[str] | None:
        for stop in value or []:
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return value

    def sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        """Unset fields take the model's defaults (models.yaml), else the engine's."""

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=pick("temperature", 1.0),
            top_p=pick("top_p", 1.0),
            top_k=pick("top_k", 0),
            min_p=defaults.get("min_p", 0.0),
            repetition_penalty=defaults.get("repetition_penalty", 1.0),
            stop=list(self.stop_sequences or []),
        )
