"""Serving Anthropic's Messages API over the same engine client as the OpenAI routes: a parsed
request to the chat turn (server/turn.py, through convert.py), then the message or its events.

The output is read as chat reads it: a reasoning model's thinking split off first
(server/reasoning.py) into a `thinking` block, tool calls parsed from the answer
(server/tool_parser.py) into `tool_use` blocks, the rest `text`. Streamed and not, the blocks
come from one builder (blocks.py). Limits, deadline, metrics and a client that leaves are
handled where the OpenAI routes handle them (server/streams.py, collect.py).

Usage: `input_tokens` are the prompt's tokens not read from the prefix cache, as Anthropic
counts them; `cache_read_input_tokens` those that were, when the engine reports them
(`GenerationOutput.num_cached_tokens`, issue 28; 0 where it does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi.responses import StreamingResponse

from hearth.engine.types import EngineClient, GenerationOutput, GenerationRequest
from hearth.server.collect import run_to_completion
from hearth.server.context import Context, new_id
from hearth.server.errors import APIError, anthropic_error
from hearth.server.messages import convert
from hearth.server.messages.blocks import Blocks, ending, matched_stop
from hearth.server.messages.protocol import Conversation, MessagesRequest
from hearth.server.reasoning import ReasoningParser
from hearth.server.streaming import event_stream, sse
from hearth.server.streams import raise_for_output
from hearth.server.tokens import resolve_max_tokens
from hearth.server.tool_parser import ToolCallParser, answer_watch
from hearth.server.turn import Turn, prepare_turn

log = logging.getLogger("hearth.server")
PING_EVERY_S = 10.0  # a `ping` event after this long without output
Parsers = tuple[ReasoningParser, ToolCallParser]  # one sample's: thinking split off, then calls


async def prepare(body: Conversation, context: Context) -> tuple[EngineClient, Turn]:
    """The engine serving `body.model` and the turn ready for it (errors name the field)."""
    engine = await context.registry.acquire(body.model)
    try:
        turn = await prepare_turn(
            engine,
            body.model,
            convert.contents(body.messages),
            partial(convert.template_messages, body),
            lambda: convert.constraints(body, engine.info),
            param="messages",
            settings=context.settings,
            options=convert.options(body),
        )
    except APIError as exc:
        raise convert.block_names(exc) from None
    return engine, turn


async def count_tokens(body: Conversation, context: Context) -> dict[str, int]:
    """`{"input_tokens": n}`: the prompt a message with this body would have."""
    _, turn = await prepare(body, context)
    return {"input_tokens": len(turn.prompt_ids)}


@dataclass
class _Reply:
    id: str
    body: MessagesRequest
    engine: EngineClient
    turn: Turn

    def parsers(self) -> Parsers:
        tool_parser = self.engine.info.tool_parser
        calls = ToolCallParser(
            self.turn.tools,
            tool_parser,
            parallel=convert.parallel(self.body),
            forced=convert.forced(self.body),
        )
        return ReasoningParser(self.turn.reasoning_parser, self.turn.opened), calls

    def watch(self) -> Callable[[str], bool]:
        """disable_parallel_tool_use: ends the sample once its one call is complete."""
        tool_parser = self.engine.info.tool_parser
        turn = self.turn
        forced = convert.forced(self.body)
        return answer_watch(turn.tools, tool_parser, forced, turn.reasoning_parser, turn.opened)

    def feed(self, blocks: Blocks, parsers: Parsers, text: str, finish: str | None) -> list[dict]:
        """One piece of output through the parsers into the blocks; the events it made."""
        thinker, calls = parsers
        split = thinker.feed(text)
        if finish is not None:
            split += thinker.finish()
        events = blocks.thinking(split.reasoning)
        if not self.turn.tools:
            return events + blocks.text(split.content)
        answer = calls.feed(split.content)
        if finish is not None:
            answer += calls.finish(finish)
        return events + blocks.answer(answer)

    def stop_fields(
        self, blocks: Blocks, text: str, token_ids: list[int], finish: str | None
    ) -> dict[str, Any]:
        """stop_reason and stop_sequence of a sample's whole output."""
        stop = None
        if finish == "stop" and not blocks.calls:
            stop = matched_stop(self.engine, text, token_ids, self.body.stop_sequences or [])
        return ending(finish, blocks.calls, stop)

    def usage(self, output_tokens: int, cached: int) -> dict[str, int]:
        prompt = len(self.turn.prompt_ids)
        return {
            "input_tokens": prompt - cached,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }

    def message(self, content: list[dict], ending: dict, usage: dict) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.body.model,
            "content": content,
            **ending,
            "usage": usage,
        }


async def serve_messages(
    body: MessagesRequest, context: Context
) -> dict[str, Any] | StreamingResponse:
    """The message object, or the stream of its events."""
    engine, turn = await prepare(body, context)
    prompt_ids = turn.prompt_ids
    max_tokens = resolve_max_tokens(engine, len(prompt_ids), body.max_tokens)
    sampling = body.sampling_params(max_tokens, engine.info.default_sampling)
    sampling.grammar = turn.grammar
    reply = _Reply(new_id("msg"), body, engine, turn)
    if body.stream:
        request = GenerationRequest(reply.id, prompt_ids, sampling, turn.images)
        outputs = await context.open_stream(engine, request)
        return event_stream(_sse(reply, outputs), done=False)
    watch = reply.watch if turn.tools and not convert.parallel(body) else None
    result = await run_to_completion(
        context, engine, reply.id, prompt_ids, sampling, watch, turn.images
    )
    choice = result.choices[0]
    blocks = Blocks()
    reply.feed(blocks, reply.parsers(), choice.text, choice.finish_reason or "stop")
    blocks.close()
    cached = choice.cached_tokens  # prompt tokens the prefix cache served
    ending = reply.stop_fields(blocks, choice.text, choice.token_ids, choice.finish_reason)
    return reply.message(blocks.content, ending, reply.usage(len(choice.token_ids), cached))


async def _sse(reply: _Reply, outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[str]:
    """The events as SSE; a failure once streaming is an `error` event (the status is sent)."""
    try:
        async with contextlib.aclosing(_events(reply, outputs)) as events:
            async for event in events:
                yield sse(event, event["type"])
    except Exception as exc:
        if not isinstance(exc, APIError):
            log.exception("stream failed")
            exc = APIError(500, f"internal error: {type(exc).__name__}: {exc}")
        yield sse(anthropic_error(exc)[1], "error")


async def _events(reply: _Reply, outputs: AsyncIterator[GenerationOutput]) -> AsyncIterator[dict]:
    """message_start, ping, the blocks' events, message_delta, message_stop (Anthropic's order).
    However it ends, `outputs` is closed (which aborts a request still running)."""
    try:
        first = await anext(outputs, None)  # already read by open_stream: no wait
        cached = first.num_cached_tokens if first is not None else 0
        stop = ending(None, 0, None) | {"stop_reason": None}
        yield {"type": "message_start", "message": reply.message([], stop, reply.usage(0, cached))}
        yield {"type": "ping"}
        blocks, parsers = Blocks(), reply.parsers()
        text, token_ids, finish = "", [], None
        pinged = with_pings(_chain(first, outputs), PING_EVERY_S)
        async with contextlib.aclosing(pinged) as stream:
            async for output in stream:
                if output is None:
                    yield {"type": "ping"}
                    continue
                raise_for_output(output)
                text += output.text
                token_ids += output.token_ids
                for event in reply.feed(blocks, parsers, output.text, output.finish_reason):
                    yield event
                if output.finish_reason is not None:
                    finish = output.finish_reason
                    break
                if reply.turn.tools and parsers[1].done:  # its one call is complete: stop here
                    finish = "stop"
                    break
    finally:
        await outputs.aclose()
    for event in blocks.close():
        yield event
    usage = reply.usage(len(token_ids), cached)
    delta = reply.stop_fields(blocks, text, token_ids, finish)
    yield {"type": "message_delta", "delta": delta, "usage": usage}
    yield {"type": "message_stop"}


async def _chain(
    first: GenerationOutput | None, outputs: AsyncGenerator[GenerationOutput, None]
) -> AsyncGenerator[GenerationOutput, None]:
    """`first`, then the rest of `outputs`; closing this closes them (aborting the request)."""
    try:
        if first is not None:
            yield first
        async for output in outputs:
            yield output
    finally:
        await outputs.aclose()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


_END = object()


async def with_pings(
    source: AsyncGenerator[GenerationOutput, None], every: float
) -> AsyncIterator[GenerationOutput | None]:
    """`source`'s items, with a None after each `every` seconds that brought none (a ping is
    due). One task reads `source` into a queue (no task per item); closing this cancels it,
    which closes `source`."""
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for item in source:
                queue.put_nowait(item)
            queue.put_nowait(_END)
        except Exception as exc:  # raised to the reader, in order
            queue.put_nowait(_Failed(exc))

    reader = asyncio.ensure_future(pump())
    try:
        while True:
            try:
                async with asyncio.timeout(every):
                    item = await queue.get()
            except TimeoutError:
                yield None
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader
        await source.aclose()
