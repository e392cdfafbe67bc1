"""The chat prompt, rendered one way for every route that takes `messages`.

Chat completions and /tokenize both call `encode_messages`, so /tokenize's `count` is the
`usage.prompt_tokens` a chat completion reports for the same messages and tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hearth.engine.types import EngineClient, MultiModalInputs
from hearth.server.content import refuse_media
from hearth.server.generation import check_text_length, tokenize
from hearth.server.images import has_images, read_images
from hearth.server.settings import ServerSettings
from hearth.server.tools import Tool, prepare_messages


async def encode_messages(
    engine: EngineClient,
    model: str,
    messages: Sequence[Any],
    tools: Sequence[Tool],
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Prompt token ids of chat `messages` (protocol ChatMessage objects) and `tools`.

    Media parts are refused (400 naming the part type and `model`), tools go to a tool-aware
    template or into the system prompt, the text is checked against the context before it is
    tokenized, and the template runs off the event loop (with `template_kwargs`: the request's
    chat_template_kwargs and reasoning effort, server/reasoning.py). Errors: APIError 400 with param
    "messages" (media, too long, a template error).
    """
    refuse_media([m.content for m in messages], model, "messages")
    rendered, template_tools = prepare_messages(
        [m.to_template() for m in messages], tools, engine.info.template_tools
    )
    check_text_length(engine, sum(len(m["content"] or "") for m in rendered), "messages")
    return await tokenize(engine.encode_chat, rendered, template_tools, template_kwargs)


async def encode_vision_messages(
    engine: EngineClient,
    model: str,
    messages: Sequence[Any],
    tools: Sequence[Tool],
    template_kwargs: dict[str, Any] | None,
    settings: ServerSettings,
) -> tuple[list[int], MultiModalInputs | None]:
    """Prompt ids of chat `messages` for a vision model, and their images (None without any).

    A conversation without image parts takes `encode_messages`' path unchanged. Otherwise each
    message with images gets a list of template parts (`{"type": "image"}` per image) and the
    model's processor renders and expands them (`encode_chat_mm`). Errors: 400s naming the part
    (limits, URLs, audio and files) or "messages" (template errors, too long).
    """
    contents = [m.content for m in messages]
    if not has_images(contents):
        return await encode_messages(engine, model, messages, tools, template_kwargs), None
    parts, images = await read_images(contents, model, "messages", settings)
    template = [m.to_template() for m in messages]
    for message, content in zip(template, parts, strict=True):
        if content is not None:
            message["content"] = content
    rendered, template_tools = prepare_messages(template, tools, engine.info.template_tools)
    chars = sum(len(m.text()) for m in messages)
    check_text_length(engine, chars, "messages")
    return await tokenize(engine.encode_chat_mm, rendered, template_tools, template_kwargs, images)
