"""Responses API request models: input items, function tools, tool_choice, text.format and
reasoning."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator

from hearth.engine.types import SamplingParams
from hearth.server.content import Part, parts_text
from hearth.server.responses.reasoning_items import with_reasoning
from hearth.server.tools import call_json
from hearth.server.wire import FunctionDef, WireModel

# Per-model defaults (models.yaml) used where the request lacks the field or leaves it unset.
DEFAULTED = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


class _Model(WireModel):
    """Unknown fields are ignored; `null` on a field with a default means the default."""


class InputMessage(_Model):
    """A message item; its `content` may be a plain string."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[Part]

    @field_validator("content", mode="before")
    @classmethod
    def _string_content(cls, value: Any) -> Any:
        return [{"type": "input_text", "text": value}] if isinstance(value, str) else value

    def to_template(self) -> dict[str, Any]:
        """The dict chat templates expect; `developer` is rendered as `system`."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": parts_text(self.content)}


class FunctionCallItem(_Model):
    """A call the model made earlier, sent back as conversation state."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None


class FunctionCallOutputItem(_Model):
    """The result of running a function call."""

    type: Literal["function_call_output"]
    call_id: str
    output: str


class SummaryText(_Model):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(_Model):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class ReasoningItem(_Model):
    """Reasoning from an earlier response (OpenAI's ResponseReasoningItem), sent back: its text
    (`content`, else its summary) goes to the assistant turn that follows it.
    `encrypted_content` is ignored (hearth never sends any)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None

    def text(self) -> str:
        parts = self.content or self.summary
        return "\n\n".join(part.text for part in parts if part.text)


class ItemReference(_Model):
    """An item of a stored response (an input or an output), named by its id."""

    type: Literal["item_reference"]
    id: str


# Capitalised tags: error locations leave them out (input[0].role, not input[0].message.role).
_ITEM_TAGS = {
    "message": "Message",
    "function_call": "FunctionCall",
    "function_call_output": "FunctionCallOutput",
    "reasoning": "Reasoning",
    "item_reference": "ItemReference",
}


def _item_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if kind is None:
        return _ITEM_TAGS["message"]
    return _ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[
    Annotated[InputMessage, Tag("Message")]
    | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")]
    | Annotated[ReasoningItem, Tag("Reasoning")]
    | Annotated[ItemReference, Tag("ItemReference")],
    Discriminator(
        _item_tag,
        custom_error_type="invalid_item",
        custom_error_message="input items must be of type message, reasoning, function_call, "
        "function_call_output or item_reference",
    ),
]


class FunctionTool(FunctionDef):
    """A function tool, flat as the Responses API has it: chat's function definition plus type."""

    type: Literal["function"]


class NamedFunction(_Model):
    type: Literal["function"]
    name: str


class AllowedToolsChoice(_Model):
    """OpenAI's `allowed_tools`: calls restricted to the tools listed, in auto or required mode."""

    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[NamedFunction] = Field(min_length=1)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tools]


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextConfig(_Model):
    format: TextFormat = Field(default_factory=TextFormat)


class ReasoningConfig(_Model):
    """OpenAI's `reasoning` object. `effort` sets the chat template's `reasoning_effort` (none
    and minimal turn thinking off where the template can) and the reasoning budget;
    `summary` asks for the reasoning as a summary part too (hearth gives it whole)."""

    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponseRequest(_Model):
    model: str
    input: list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = None
    store: bool | None = None  # None means true
    background: bool | None = None  # run it as a task; the response is returned queued
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | AllowedToolsChoice | None = (
        None
    )
    parallel_tool_calls: bool | None = None
    truncation: Literal["auto", "disabled"] = "disabled"  # auto: drop the oldest items to fit
    include: list[str] | None = None  # "message.output_text.logprobs": the answer's logprobs
    top_logprobs: int | None = Field(None, ge=0, le=20)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    # hearth extensions (vLLM's names): a reasoning budget in tokens, more template variables
    max_reasoning_tokens: int | None = Field(None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None
    priority: int = Field(0, ge=0, le=2**31 - 1)  # vLLM's: lower first; >= 0 (server/wire.py)

    @field_validator("input", mode="before")
    @classmethod
    def _string_input(cls, value: Any) -> Any:
        return [{"role": "user", "content": value}] if isinstance(value, str) else value

    @property
    def logprobs_k(self) -> int | None:
        """Alternatives per token when the output text's logprobs are included (else None)."""
        if LOGPROBS_INCLUDE not in (self.include or []):
            return None
        return self.top_logprobs or 0

    def sampling_params(self, max_tokens: int, defaults: dict[str, Any]) -> SamplingParams:
        params = {name: defaults[name] for name in DEFAULTED if name in defaults}
        params.update(self.model_dump(include={"temperature", "top_p"}, exclude_none=True))
        return SamplingParams(
            max_tokens=max_tokens, logprobs=self.logprobs_k, priority=self.priority, **params
        )

    def contents(self) -> list[Any]:
        """Each input item's content parts (None for items that are not messages)."""
        return [item.content if isinstance(item, InputMessage) else None for item in self.input]

    def turns(self, parts: list[Any] | None = None) -> list[dict[str, Any]]:
        """The input as chat-template messages; calls join the assistant turn they follow, and
        reasoning items go to the assistant turn after them (dropped when none follows).
        `parts[i]`: vision models' template content of input item i (None: its text)."""
        turns: list[dict[str, Any]] = []
        reasoning: list[str] = []
        for i, item in enumerate(self.input):
            if isinstance(item, ReasoningItem):
                reasoning.append(item.text())
                continue
            if isinstance(item, InputMessage):
                turns.append(item.to_template())
                if parts is not None and parts[i] is not None:
                    turns[-1]["content"] = parts[i]
            elif isinstance(item, FunctionCallOutputItem):
                turns.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            else:
                call = call_json(item.call_id, item.name, item.arguments)
                if not turns or turns[-1]["role"] != "assistant":
                    turns.append({"role": "assistant", "content": ""})
                turns[-1].setdefault("tool_calls", []).append(call)
            if turns[-1]["role"] == "assistant":
                with_reasoning(turns[-1], "\n\n".join(filter(None, reasoning)))
            reasoning = []
        return turns
