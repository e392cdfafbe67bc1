"""Serving a chat completion: a parsed request to an engine request, then the response or its
SSE chunks. vLLM's `prompt_logprobs` (the rendered prompt's tokens scored) is a top-level field of
the response, as in vLLM; streamed responses do not carry it.

Reasoning models (server/reasoning.py): the thinking is split from the answer into
`message.reasoning_content` and `message.reasoning` (the same text under both peers' names;
streamed as `delta.reasoning_content` / `delta.reasoning` before the content deltas), counted in
`usage.completion_tokens_details.reasoning_tokens`; tool calls are parsed from the answer only,
and a grammar (response_format, a forced tool) applies after the block closes. Logprobs cover
every generated token, thinking included."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi.responses import StreamingResponse

from hearth.engine.types import (
    EngineClient,
    GenerationOutput,
    GenerationRequest,
    Grammar,
    ModelInfo,
    TokenLogprob,
)
from hearth.server.chat.protocol import AllowedToolsChoice, ChatCompletionRequest, ChatMessage
from hearth.server.collect import run_to_completion
from hearth.server.context import Context, new_id
from hearth.server.logprobs import LogprobAligner, aligned, chat_logprobs, vllm_prompt_logprobs
from hearth.server.reasoning import ReasoningParser, count_reasoning_tokens, split_text
from hearth.server.streaming import event_stream, sse
from hearth.server.streams import raise_for_output
from hearth.server.tokens import resolve_max_tokens
from hearth.server.tool_parser import Event, ToolCallParser, answer_watch, parse_output
from hearth.server.tools import Tool, allowed, call_json, format_grammar, function_tools, plan
from hearth.server.turn import TurnOptions, prepare_turn
from hearth.server.usage import usage


@dataclass
class _Reply:
    """What every chunk or response of one request shares."""

    id: str
    model: str
    created: int
    engine: EngineClient
    prompt_tokens: int
    tools: list[Tool]  # offered to the model: its output is parsed for calls
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only
    forced: bool = False  # tool_choice required or named: the output is a call, never content
    opened: bool = False  # the prompt left a reasoning block open (the template opened it)
    thinks: bool = True  # False: the prompt closed the block (thinking off): all is answer

    @property
    def reasoning_parser(self) -> str:
        """How this reply's thinking is split off ("none": the model or prompt has none)."""
        return self.engine.info.reasoning_parser if self.thinks else "none"

    def parser(self) -> ToolCallParser:
        """A tool-call parser for one choice's output."""
        parser = self.engine.info.tool_parser
        return ToolCallParser(self.tools, parser, parallel=self.parallel, forced=self.forced)

    def thinker(self) -> ReasoningParser:
        """A reasoning parser for one choice's output."""
        return ReasoningParser(self.reasoning_parser, self.opened)

    def ends_after(self) -> Callable[[str], bool]:
        """parallel_tool_calls false: a watcher that ends a choice once the answer's one call
        is complete (server/tool_parser.py, answer_watch)."""
        parser = self.engine.info.tool_parser
        return answer_watch(self.tools, parser, self.forced, self.reasoning_parser, self.opened)

    def base(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }


async def serve_chat(
    body: ChatCompletionRequest, context: Context
) -> dict[str, Any] | StreamingResponse:
    """The chat.completion object, or the stream of its chunks."""
    engine = await context.registry.acquire(body.model)
    turn = await prepare_turn(
        engine,
        body.model,
        [m.content for m in body.messages],
        partial(template_messages, body.messages),
        lambda: constraints(body, engine.info),
        param="messages",
        settings=context.settings,
        options=TurnOptions(
            body.reasoning_effort, body.chat_template_kwargs, body.max_reasoning_tokens
        ),
    )
    prompt_ids, images, tools = turn.prompt_ids, turn.images, turn.tools
    max_tokens = resolve_max_tokens(
        engine, len(prompt_ids), body.requested_max_tokens, body.max_tokens_param, "messages"
    )
    sampling = body.sampling_params(max_tokens, engine.info.default_sampling, body.logprobs_k)
    sampling.grammar = turn.grammar
    reply = _Reply(new_id("chatcmpl"), body.model, int(time.time()), engine, len(prompt_ids), tools)
    reply.parallel = body.parallel_tool_calls is not False
    reply.forced = forces_call(body.tool_choice)
    reply.opened, reply.thinks = turn.opened, turn.reasoning_parser != "none"
    if body.stream:
        outputs = await context.open_stream(
            engine, GenerationRequest(reply.id, prompt_ids, sampling, images)
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_chunks(reply, outputs, sampling.n, include_usage))
    watch = reply.ends_after if tools and not reply.parallel else None
    result = await run_to_completion(context, engine, reply.id, prompt_ids, sampling, watch, images)
    reasoning_tokens = sum(
        count_reasoning_tokens(engine, c.token_ids, reply.reasoning_parser, reply.opened)
        for c in result.choices
    )
    return {
        **reply.base("chat.completion"),
        "choices": [
            {
                "index": choice.index,
                **_message(reply, choice.text, choice.finish_reason),
                "logprobs": chat_logprobs(
                    engine, aligned(engine, choice.text, choice.logprobs, choice.finish_reason)
                )
                if body.logprobs
                else None,
            }
            for choice in result.choices
        ],
        "usage": chat_usage(result.usage(), reasoning_tokens),
        **_prompt_logprobs(engine, body, result.choices[0].prompt_logprobs),
    }


def template_messages(
    messages: list[ChatMessage], parts: list[Any] | None = None
) -> list[dict[str, Any]]:
    """`messages` as the chat template reads them; `parts[i]`: message i's template content
    parts for a vision model's images (None: its text)."""
    rendered = [m.to_template() for m in messages]
    for message, content in zip(rendered, parts or [None] * len(rendered), strict=True):
        if content is not None:
            message["content"] = content
    return rendered


def chat_usage(counts: dict[str, Any], reasoning_tokens: int) -> dict[str, Any]:
    """Chat's usage: the counts, and how many completion tokens were thinking."""
    return {**counts, "completion_tokens_details": {"reasoning_tokens": reasoning_tokens}}


def _prompt_logprobs(
    engine: EngineClient, body: ChatCompletionRequest, scores: list[TokenLogprob | None] | None
) -> dict[str, Any]:
    """vLLM's top-level `prompt_logprobs`, when the request asked for it."""
    if body.prompt_logprobs is None:
        return {}
    return {"prompt_logprobs": vllm_prompt_logprobs(engine, scores, body.prompt_logprobs)}


def forces_call(choice: object) -> bool:
    """Whether tool_choice makes the output a call (required, named, allowed_tools required)."""
    if isinstance(choice, AllowedToolsChoice):
        return choice.allowed_tools.mode == "required"
    return choice == "required" or not isinstance(choice, str | None)


def constraints(body: ChatCompletionRequest, info: ModelInfo) -> tuple[list[Tool], Grammar | None]:
    """The tools offered to the model, and the grammar its output must follow (if any)."""
    tools = function_tools(body.tools)
    choice = body.tool_choice
    if isinstance(choice, AllowedToolsChoice):
        tools = allowed(tools, choice.names, "tool_choice.allowed_tools.tools")
        choice = choice.allowed_tools.mode
    named = None if isinstance(choice, str | None) else choice.function.name
    fmt = body.response_format
    output = format_grammar(
        fmt.type if fmt else "text",
        fmt.json_schema.schema_ if fmt and fmt.json_schema else None,
        "response_format",
        "response_format.json_schema.schema",
    )
    return plan(
        tools, None if named else choice, named, body.parallel_tool_calls, info.tool_parser, output
    )


def _message(reply: _Reply, text: str, finish_reason: str | None) -> dict[str, Any]:
    """A choice's message and finish_reason: the thinking split off (reasoning models), calls
    found in the answer become tool_calls."""
    split = split_text(text, reply.reasoning_parser, reply.opened)
    text = split.content
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if reply.engine.info.reasoning_parser != "none":  # a thinking model: the fields are there
        message.update(_reasoning(split.reasoning or None))
    if reply.tools:
        message["content"], calls = parse_output(
            text,
            reply.tools,
            reply.engine.info.tool_parser,
            parallel=reply.parallel,
            forced=reply.forced,
            reason=finish_reason,
        )
        if calls:
            message["tool_calls"] = [call_json(c.id, c.name, c.arguments) for c in calls]
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
    return {"message": message, "finish_reason": finish_reason}


def _reasoning(text: str | None) -> dict[str, Any]:
    """Thinking under both peers' names (SGLang/llama.cpp `reasoning_content`, vLLM `reasoning`)."""
    return {"reasoning_content": text, "reasoning": text}


def _delta(event: Event) -> dict[str, Any]:
    """A parser event as a chunk's delta: content, a call's id and name, or argument text."""
    if event[0] == "content":
        return {"content": event[1]}
    if event[0] == "call":
        call = event[2]
        return {"tool_calls": [{**call_json(call.id, call.name, ""), "index": event[1]}]}
    return {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}


async def _chunks(
    reply: _Reply,
    outputs: AsyncIterator[GenerationOutput],
    n: int,
    include_usage: bool,
) -> AsyncIterator[str]:
    """First a role delta per choice, then content deltas, a finish chunk, optional usage."""
    base = reply.base("chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, logprobs: Any = None, finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    parsers = [reply.parser() for _ in range(n)]
    thinkers = [reply.thinker() for _ in range(n)]
    held: list[list] = [[] for _ in range(n)]  # logprobs of text the tool parser holds back
    aligners = [LogprobAligner(reply.engine) for _ in range(n)]  # logprobs follow the text
    completion_tokens = cached_tokens = 0
    ended: set[int] = set()  # choices finished early: their one call is complete
    async for output in outputs:
        raise_for_output(output)
        if output.index in ended:
            continue
        completion_tokens += len(output.token_ids)
        cached_tokens = max(cached_tokens, output.num_cached_tokens)
        placed = aligners[output.index].feed(output.text, output.logprobs, output.finish_reason)
        thinker = thinkers[output.index]
        split = thinker.count(output.text, len(output.token_ids))
        if output.finish_reason is not None:
            split += thinker.finish()
        if split.reasoning:  # thinking comes first; its logprobs ride on its delta
            logprobs = chat_logprobs(reply.engine, placed) if placed else None
            yield chunk(output.index, _reasoning(split.reasoning), logprobs)
            placed = []
        if not reply.tools:
            if split.content or placed:
                logprobs = chat_logprobs(reply.engine, placed) if placed else None
                yield chunk(output.index, {"content": split.content}, logprobs)
        else:
            parser, entries = parsers[output.index], held[output.index]
            entries += placed
            events = parser.feed(split.content)
            if output.finish_reason is not None:
                events += parser.finish(output.finish_reason)
            for delta in map(_delta, events):
                logprobs = chat_logprobs(reply.engine, entries) if entries else None
                yield chunk(output.index, delta, logprobs)
                entries.clear()
        done = reply.tools and parsers[output.index].done
        if output.finish_reason is not None or done:
            finish = output.finish_reason or "stop"
            if parsers[output.index].calls and finish == "stop":
                finish = "tool_calls"
            entries = held[output.index]
            logprobs = chat_logprobs(reply.engine, entries) if entries else None
            yield chunk(output.index, {}, logprobs, finish=finish)
            ended.add(output.index)
            if done and len(ended) == n:  # parallel_tool_calls false: stop generating
                await outputs.aclose()
                break
    if include_usage:
        counts = usage(reply.prompt_tokens, completion_tokens, cached_tokens)
        reasoning_tokens = sum(t.reasoning_tokens for t in thinkers)
        yield sse({**base, "choices": [], "usage": chat_usage(counts, reasoning_tokens)})
