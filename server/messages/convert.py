"""An Anthropic conversation as the chat turn server/turn.py prepares: content parts for the media
checks, chat-template messages, tools and their plan, thinking as the reasoning controls.

Mapping (the template sees what an OpenAI chat with the same turns would give it):
- `system` (a string or text blocks, joined by blank lines) is a first `system` message;
- a user message's `tool_result` blocks become `tool` messages (`tool_call_id`; `is_error`
  prefixes the text with "Error: "), before the user message holding its text and images;
- an assistant message's `text` is its content, `thinking` its `reasoning_content`, each
  `tool_use` a tool call (`input` as JSON arguments); `redacted_thinking` is dropped;
- `tool_choice` auto / any / tool / none is chat's auto / required / named / none, and
  `disable_parallel_tool_use` chat's `parallel_tool_calls: false`;
- `thinking: enabled` is `enable_thinking: true` with `budget_tokens` as the reasoning budget
  (`adaptive`, `between_tools`: without a budget); `disabled` is reasoning effort "none"
  (`enable_thinking: false`, a budget of 0).
"""

from __future__ import annotations

import json
from typing import Any

from hearth.engine.types import Grammar, ModelInfo
from hearth.server.content import ImageURL, MediaPart, TextPart
from hearth.server.errors import APIError
from hearth.server.messages.protocol import (
    Conversation,
    ImageBlock,
    Message,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from hearth.server.tools import Tool, call_json, plan
from hearth.server.turn import TurnOptions

_CHOICES = {"auto": "auto", "any": "required", "none": "none", "tool": None}


def contents(messages: list[Message]) -> list[Any]:
    """Each message's content as server/content.py parts, one per block, so that a media error
    names `messages[i].content[j]`: text and images as such, other blocks as empty text."""
    out: list[Any] = []
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            out.append(message.content)
            continue
        parts: list[Any] = []
        for j, block in enumerate(message.content):
            if isinstance(block, TextBlock):
                parts.append(TextPart(text=block.text))
            elif isinstance(block, ImageBlock):
                parts.append(MediaPart(type="image_url", image_url=ImageURL(url=block.url)))
            else:
                _refuse_result_images(block, f"messages[{i}].content[{j}]")
                parts.append(TextPart(text=""))
        out.append(parts)
    return out


def block_names(error: APIError) -> APIError:
    """An image error from the shared turn preparation, in this API's names: an image block's
    data is its `source` (chat's part calls it `image_url`), and the part is an `image`."""
    if error.param:
        error.param = error.param.replace(".image_url", ".source")
    error.message = error.message.replace("'image_url'", "'image'")
    return error


def _refuse_result_images(block: Any, where: str) -> None:
    if isinstance(block, ToolResultBlock) and not isinstance(block.content, str):
        for k, part in enumerate(block.content):
            if isinstance(part, ImageBlock):
                raise APIError(
                    400,
                    "Images inside tool_result content are not supported; send them in a "
                    "user content block.",
                    param=f"{where}.content[{k}]",
                )


def template_messages(body: Conversation, parts: list[Any] | None = None) -> list[dict[str, Any]]:
    """The conversation as chat-template messages; `parts[i]`: message i's template parts for a
    vision model's images (None: its text)."""
    out: list[dict[str, Any]] = []
    system = body.system_text()
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        vision = parts[i] if parts else None
        if message.role == "user":
            out += _user(message, vision)
        else:
            out.append(_assistant(message))
    return out


def _user(message: Message, vision: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if isinstance(message.content, str):
        return [{"role": "user", "content": message.content}]
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for block in message.content:
        if isinstance(block, ToolResultBlock):
            text = f"Error: {block.text()}" if block.is_error else block.text()
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
        elif isinstance(block, TextBlock):
            texts.append(block.text)
    if vision is not None:  # text and image parts, the other blocks' empty stand-ins dropped
        content = [p for p in vision if p.get("type") != "text" or p.get("text")]
        out.append({"role": "user", "content": content})
    elif texts or not out:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _assistant(message: Message) -> dict[str, Any]:
    if isinstance(message.content, str):
        return {"role": "assistant", "content": message.content}
    texts, thoughts, calls = [], [], []
    for block in message.content:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thoughts.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(call_json(block.id, block.name, json.dumps(block.input)))
    rendered: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        rendered["tool_calls"] = calls
    if thoughts:
        rendered["reasoning_content"] = rendered["reasoning"] = "\n".join(thoughts)
    return rendered


def constraints(body: Conversation, info: ModelInfo) -> tuple[list[Tool], Grammar | None]:
    """The tools offered (their calls are parsed) and the grammar of a forced call."""
    tools = [
        Tool.checked(t.name, t.description, t.input_schema, f"tools[{i}].input_schema")
        for i, t in enumerate(body.tools or [])
    ]
    choice = body.tool_choice
    if choice is None or (not tools and choice.type in ("auto", "none")):
        return plan(tools, None, None, None, info.tool_parser, None)
    named = choice.name if choice.type == "tool" else None
    parallel = not choice.disable_parallel_tool_use
    return plan(tools, _CHOICES[choice.type], named, parallel, info.tool_parser, None)


def forced(body: Conversation) -> bool:
    """tool_choice any or a named tool: the output is a call, never text."""
    return body.tool_choice is not None and body.tool_choice.type in ("any", "tool")


def parallel(body: Conversation) -> bool:
    return body.tool_choice is None or not body.tool_choice.disable_parallel_tool_use


def options(body: Conversation) -> TurnOptions:
    """`thinking` as the chat turn's reasoning controls (unset: the model's own behaviour)."""
    if body.thinking is None:
        return TurnOptions()
    if body.thinking.type == "disabled":
        return TurnOptions(effort="none")
    budget = body.thinking.budget_tokens if body.thinking.type == "enabled" else None
    return TurnOptions(None, {"enable_thinking": True}, budget)
