"""Serving the Responses API: a parsed request to an engine request, then the response object or
its event stream; stored responses retrieved and deleted."""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from hearth.engine.types import GenerationOutput, GenerationRequest, Grammar, ModelInfo
from hearth.server.collect import run_to_completion
from hearth.server.context import Context
from hearth.server.errors import APIError
from hearth.server.images import has_images
from hearth.server.reasoning import count_reasoning_tokens
from hearth.server.responses import background
from hearth.server.responses.items import resolve_references, stored_items
from hearth.server.responses.output import OutputItems, assistant_turn
from hearth.server.responses.protocol import AllowedToolsChoice, ResponseRequest
from hearth.server.responses.reasoning_items import Reasoning
from hearth.server.responses.reply import Reply
from hearth.server.responses.store import ResponseStore
from hearth.server.responses.text_logprobs import TextLogprobs
from hearth.server.responses.truncation import encode_fitting
from hearth.server.streaming import event_stream, sse
from hearth.server.streams import open_stream
from hearth.server.tokens import resolve_max_tokens
from hearth.server.tool_parser import answer_watch
from hearth.server.tools import Tool, allowed, format_grammar, plan
from hearth.server.turn import Turn, TurnOptions, prepare_turn

log = logging.getLogger("hearth.server")


# -- conversation and storage ------------------------------------------------------------------


def not_found(response_id: str, param: str | None = None) -> APIError:
    prefix = "Previous response" if param else "Response"
    code = "previous_response_not_found" if param else None
    return APIError(404, f"{prefix} with id '{response_id}' not found.", param=param, code=code)


def conversation(body: ResponseRequest, store: ResponseStore) -> list[dict[str, Any]]:
    """The turns so far: the previous response's conversation, then this request's input."""
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            raise not_found(body.previous_response_id, "previous_response_id")
        history = previous.messages
    return [*history, *body.turns()]


def keep(
    store: ResponseStore,
    turns: list[dict[str, Any]],
    response: dict[str, Any],
    input_items: list[dict[str, Any]] | None = None,
) -> None:
    """Store a finished response with its conversation and input items (unless store=false, or
    it failed in the foreground: a background one is kept to be polled)."""
    if not response["store"] or (response["status"] == "failed" and not response["background"]):
        return
    store.put(response, [*turns, assistant_turn(response["output"])], input_items)


def constraints(body: ResponseRequest, info: ModelInfo) -> tuple[list[Tool], Grammar | None]:
    """The tools offered to the model, and the grammar its output must follow (if any)."""
    tools = [
        Tool.checked(t.name, t.description, t.parameters, f"tools[{i}].parameters")
        for i, t in enumerate(body.tools or [])
    ]
    choice = body.tool_choice
    if isinstance(choice, AllowedToolsChoice):
        tools = allowed(tools, choice.names, "tool_choice.tools")
        choice = choice.mode
    named = None if isinstance(choice, str | None) else choice.name
    fmt = body.text.format if body.text else None
    output = format_grammar(
        fmt.type if fmt else "text",
        fmt.schema_ if fmt else None,
        "text.format",
        "text.format.schema",
    )
    return plan(
        tools, None if named else choice, named, body.parallel_tool_calls, info.tool_parser, output
    )


# -- streaming ---------------------------------------------------------------------------------


async def response_events(
    reply: Reply,
    items: OutputItems,
    outputs: AsyncIterator[GenerationOutput],
    settle: Callable[[dict[str, Any]], None],
) -> AsyncIterator[dict[str, Any]]:
    """The Responses event sequence; an engine failure ends in response.failed."""
    sequence = itertools.count()

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(sequence), **fields}

    yield event("response.created", response=reply.snapshot("in_progress"))
    yield event("response.in_progress", response=reply.snapshot("in_progress"))
    for kind, fields in items.feed(""):
        yield event(kind, **fields)
    tokens, reason, error = 0, None, None
    try:
        async for output in outputs:
            tokens += len(output.token_ids)
            reply.cached_tokens = max(reply.cached_tokens, output.num_cached_tokens)
            reason = output.finish_reason or reason
            if output.finish_reason == "error":
                error = output.error or "engine error"
                break
            fed = items.feed(
                output.text, len(output.token_ids), output.logprobs, output.finish_reason
            )
            for kind, fields in fed:
                yield event(kind, **fields)
            if items.done:  # parallel_tool_calls false: the one call is complete
                reason = output.finish_reason or "stop"
                break
    except Exception as exc:  # the engine failed mid-stream; the status line is long gone
        log.exception("response stream failed")
        error = f"{type(exc).__name__}: {exc}"
    finally:
        await outputs.aclose()  # a no-op when finished; aborts the request otherwise
    final, closing = reply.finish(items, reason, tokens, error)
    for kind, fields in closing:
        yield event(kind, **fields)
    settle(final)
    yield event(f"response.{final['status']}", response=final)


async def as_sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    async for event in events:
        yield sse(event, event=event["type"])


# -- serving -----------------------------------------------------------------------------------


async def serve_response(
    body: ResponseRequest, context: Context, store: ResponseStore
) -> dict[str, Any] | StreamingResponse:
    """The response object, or its event stream; kept in `store` unless store=false."""
    if body.background and body.store is False:
        message = "background responses must be stored (store=false)."
        raise APIError(400, message, param="background")
    body.input = resolve_references(body.input, store)
    input_items = stored_items(body.input)
    engine = await context.registry.acquire(body.model)
    turns = conversation(body, store)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    history = turns[: len(turns) - len(body.turns())]  # a stored conversation keeps text only
    effort = body.reasoning.effort if body.reasoning else None

    def prepare(kept: list[dict[str, Any]]) -> Awaitable[Turn]:
        """The turn with `kept` of the conversation (truncation); a vision input with images
        keeps it whole (its images' parts replace the current turns)."""

        def render(parts: list[Any] | None) -> list[dict[str, Any]]:
            if parts is None:
                return [*system, *kept]
            return [*system, *history, *body.turns(parts)]

        return prepare_turn(
            engine,
            body.model,
            body.contents(),
            render,
            lambda: constraints(body, engine.info),
            param="input",
            settings=context.settings,
            options=TurnOptions(effort, body.chat_template_kwargs, body.max_reasoning_tokens),
        )

    truncation = None if engine.info.vision and has_images(body.contents()) else body.truncation
    turn = await encode_fitting(
        prepare,
        lambda t: len(t.prompt_ids),
        turns,
        truncation,
        engine.info.max_model_len,
        body.max_output_tokens or 1,
    )
    prompt_ids, images, tools = turn.prompt_ids, turn.images, turn.tools
    thinks, opened = turn.reasoning_parser, turn.opened
    max_tokens = resolve_max_tokens(
        engine, len(prompt_ids), body.max_output_tokens, "max_output_tokens", "input"
    )
    sampling = body.sampling_params(max_tokens, engine.info.default_sampling)
    sampling.grammar = turn.grammar
    reply = Reply(body, sampling, len(prompt_ids))
    choice = body.tool_choice
    if isinstance(choice, AllowedToolsChoice):
        choice = choice.mode
    forced = choice == "required" or not isinstance(choice, str | None)
    summary = body.reasoning is not None and body.reasoning.summary is not None
    items = OutputItems(
        tools,
        engine.info.tool_parser,
        parallel=body.parallel_tool_calls is not False,
        forced=forced,
        reasoning=Reasoning(thinks, opened, summary),
        logprobs=TextLogprobs(engine) if body.logprobs_k is not None else None,
    )
    request = GenerationRequest(reply.id, prompt_ids, sampling, images)

    def settle(response: dict[str, Any]) -> None:
        keep(store, turns, response, input_items)

    if body.background:
        runs = background.get_runs(context.http.app)
        runs.check_capacity(context.settings.max_background_runs)

        async def events() -> AsyncIterator[dict[str, Any]]:  # its own deadline and cap
            limits = background.run_limits(context.settings)
            outputs = await open_stream(engine, request, context.metrics, limits)
            return response_events(reply, items, outputs, settle)

        return background.start(
            runs,
            store,
            reply.snapshot("queued"),
            turns,
            input_items,
            events,
            lambda: reply.snapshot("cancelled", output=items.items),
            bool(body.stream),
        )
    if body.stream:
        outputs = await context.open_stream(engine, request)
        return event_stream(as_sse(response_events(reply, items, outputs, settle)), done=False)
    parser = engine.info.tool_parser
    watch = (
        (lambda: answer_watch(tools, parser, forced, thinks, opened))
        if tools and body.parallel_tool_calls is False
        else None
    )
    result = await run_to_completion(context, engine, reply.id, prompt_ids, sampling, watch, images)
    choice = result.choices[0]
    reply.cached_tokens = result.cached_tokens
    items.feed(choice.text, 0, choice.logprobs, choice.finish_reason)
    thought = count_reasoning_tokens(engine, choice.token_ids, thinks, opened)
    response, _ = reply.finish(
        items, choice.finish_reason, len(choice.token_ids), reasoning_tokens=thought
    )
    if response["status"] == "failed":
        raise APIError(500, response["error"]["message"], code="engine_error")
    keep(store, turns, response, input_items)
    return response


def retrieve(store: ResponseStore, response_id: str) -> dict[str, Any]:
    stored = store.get(response_id)
    if stored is None:
        raise not_found(response_id)
    return stored.response


def delete(store: ResponseStore, response_id: str) -> dict[str, Any]:
    if store.pop(response_id) is None:
        raise not_found(response_id)
    return {"id": response_id, "object": "response.deleted", "deleted": True}
