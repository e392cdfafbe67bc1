"""One chat turn, prepared one way for every route that renders a chat template: chat completions,
Responses and /tokenize (and any later wire over the same engine client).

`prepare_turn` refuses media a text-only model cannot read, builds the tools and the output's
grammar, renders the template (a vision model's images read and expanded by its processor),
checks the text against the context before tokenizing, tokenizes off the event loop, and finds
where the prompt leaves a reasoning block, so the grammar starts after the thinking and the
reasoning budget applies. Because the three routes share it, /tokenize's `count` is the
`usage.prompt_tokens` (or `input_tokens`) the others report for the same messages and tools.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hearth.engine.types import EngineClient, Grammar, MultiModalInputs
from hearth.server.content import refuse_media
from hearth.server.images import has_images, read_images
from hearth.server.reasoning import prompt_block, reasoning_budget, template_kwargs, think_grammar
from hearth.server.settings import ServerSettings
from hearth.server.tokens import check_text_length, tokenize
from hearth.server.tools import Tool, prepare_messages

Render = Callable[[list[Any] | None], list[dict[str, Any]]]
"""The conversation as chat-template messages; given each content's template parts for a vision
model's images (`read_images`; None where a message has none), those replace its text."""

Constraints = Callable[[], tuple[list[Tool], Grammar | None]]
"""The tools offered and the output's own grammar (response_format, a forced call), if any;
called after the media check, so a text-only model's media error comes first."""


@dataclass(frozen=True)
class TurnOptions:
    """A request's reasoning and template controls (all optional)."""

    effort: str | None = None  # reasoning_effort: a budget, and enable_thinking for none/minimal
    chat_template_kwargs: dict[str, Any] | None = None
    max_reasoning_tokens: int | None = None  # overrides the effort's budget


@dataclass(frozen=True)
class Turn:
    """A chat turn ready for the engine."""

    prompt_ids: list[int]
    images: MultiModalInputs | None  # a vision model's processed images; None without any
    tools: list[Tool]
    grammar: Grammar | None  # the output's grammar, after the thinking (engine/constrained/)
    reasoning_parser: str  # how the output's thinking splits off; "none": it does not think
    opened: bool  # the prompt ends inside a reasoning block (the template opened it)


def _chars(messages: Sequence[dict[str, Any]]) -> int:
    """Characters of text in rendered messages (a vision message's text parts)."""
    total = 0
    for message in messages:
        content = message.get("content") or ""
        if isinstance(content, str):
            total += len(content)
        else:
            total += sum(len(part.get("text") or "") for part in content)
    return total


async def prepare_turn(
    engine: EngineClient,
    model: str,
    contents: list[Any],
    render: Render,
    constraints: Constraints,
    *,
    param: str,
    settings: ServerSettings,
    options: TurnOptions = TurnOptions(),
) -> Turn:
    """Prompt token ids and everything the output's parsing needs.

    `contents`: each message's content as sent (strings or content parts; only lists are read
    for media), in the order `render` receives their parts. `param`: the request field they came
    from ("messages", "input"). Errors: APIError 400 naming `param` (too long, template error) or
    the part (media on a text-only model, image limits), and the constraints' own 400s.
    """
    vision = engine.info.vision and has_images(contents)
    if not vision:  # a vision model's images go to read_images, which refuses other media
        refuse_media(contents, model, param)
    tools, grammar = constraints()
    kwargs = template_kwargs(options.effort, options.chat_template_kwargs)
    parts, pictures = await read_images(contents, model, param, settings) if vision else (None, [])
    messages, template_tools = prepare_messages(render(parts), tools, engine.info.template_tools)
    check_text_length(engine, _chars(messages), param)
    images: MultiModalInputs | None = None
    if vision:
        prompt_ids, images = await tokenize(
            engine.encode_chat_mm, messages, template_tools, kwargs, pictures, param=param
        )
    else:
        prompt_ids = await tokenize(
            engine.encode_chat, messages, template_tools, kwargs, param=param
        )
    block = prompt_block(engine, prompt_ids)  # "closed": thinking is off (enable_thinking)
    parser = engine.info.reasoning_parser if block != "closed" else "none"
    opened = block == "open"
    budget = reasoning_budget(options.effort, options.max_reasoning_tokens)
    grammar = think_grammar(grammar, parser, opened, budget)
    return Turn(prompt_ids, images, tools, grammar, parser, opened)
