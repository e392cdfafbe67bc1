"""The chat prompt, rendered one way for every route that takes `messages`.

Chat completions and /tokenize both call `encode_messages`, so /tokenize's `count` is the
`usage.prompt_tokens` a chat completion reports for the same messages and tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hearth.engine.types import EngineClient
from hearth.server.content import refuse_media
from hearth.server.generation import check_text_length, tokenize
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
