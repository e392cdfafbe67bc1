"""Serving /tokenize and /detokenize through the engine client's tokenizer (no generation).

Messages are rendered exactly as the chat route renders them (media refused by text-only models,
a vision model's images expanded, tools prepared for the template, the same `encode_chat`), so
`count` equals a chat completion's `usage.prompt_tokens` for the same messages and tools.

`EngineClient.encode` always adds the tokenizer's special tokens and `encode_chat` never does.
`add_special_tokens` is served around that: a tokenizer adds a fixed prefix and suffix around
any text (BOS, sometimes EOS), found from `encode("")` and a probe, then stripped from a prompt
or added around a chat. A tokenizer that does not work that way gets a 400 naming the field.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from hearth.engine.types import EngineClient
from hearth.server.chat.serving import template_messages
from hearth.server.context import Context
from hearth.server.errors import APIError
from hearth.server.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from hearth.server.tokens import check_text_length, tokenize
from hearth.server.tools import function_tools
from hearth.server.turn import TurnOptions, prepare_turn

_PROBE = "a"


async def serve_tokenize(body: TokenizeRequest, context: Context) -> dict[str, Any]:
    """{count, max_model_len, tokens, token_strs}: vLLM's TokenizeResponse."""
    engine = await context.registry.acquire(body.model, task=None)
    if body.messages is None:
        assert body.prompt is not None  # the protocol holds exactly one of the two
        check_text_length(engine, len(body.prompt), "prompt")
        ids = await tokenize(_encode_prompt, engine, body.prompt, body.special_tokens)
    else:
        ids = await _encode_messages(engine, body, context)
    token_strs = None
    if body.return_token_strs:
        pieces = await tokenize(engine.token_pieces, ids, param="tokens")
        token_strs = [piece.decode(errors="replace") for piece, _ in pieces]
    return {
        "count": len(ids),
        "max_model_len": engine.info.max_model_len,
        "tokens": ids,
        "token_strs": token_strs,
    }


async def serve_detokenize(body: DetokenizeRequest, context: Context) -> dict[str, str]:
    """{prompt}: vLLM's DetokenizeResponse. Special tokens are kept (vLLM's decoding)."""
    engine = await context.registry.acquire(body.model, task=None)
    _check_ids(body.tokens)
    try:
        pieces = await tokenize(engine.token_pieces, body.tokens, param="tokens")
    except (ValueError, OverflowError, IndexError, KeyError):
        raise _bad_ids() from None
    for i, (piece, special) in enumerate(pieces):
        if not piece and not special:  # the tokenizer has no such id
            raise _bad_ids(f" (tokens[{i}] = {body.tokens[i]})")
    return {"prompt": b"".join(piece for piece, _ in pieces).decode(errors="replace")}


def _check_ids(ids: list[int]) -> None:
    for i, token in enumerate(ids):
        if token < 0:
            raise _bad_ids(f" (tokens[{i}] = {token})")


def _bad_ids(where: str = "") -> APIError:
    return APIError(400, f"token ids must be ids of the model's vocabulary{where}", param="tokens")


async def _encode_messages(
    engine: EngineClient, body: TokenizeRequest, context: Context
) -> list[int]:
    """The chat route's rendering (server/turn.py; a vision model's images expanded into
    their placeholder tokens), then the special tokens."""
    assert body.messages is not None
    _refuse_unsupported(body)
    turn = await prepare_turn(  # the chat route's preparation, so count == usage.prompt_tokens
        engine,
        body.model,
        [m.content for m in body.messages],
        partial(template_messages, body.messages),
        lambda: (function_tools(body.tools), None),
        param="messages",
        settings=context.settings,
        options=TurnOptions(chat_template_kwargs=body.chat_template_kwargs),
    )
    ids = turn.prompt_ids
    if body.special_tokens:
        prefix, suffix = await tokenize(_special_ends, engine, param="add_special_tokens")
        ids = [*prefix, *ids, *suffix]
    return ids


def _refuse_unsupported(body: TokenizeRequest) -> None:
    """vLLM options hearth's engine client cannot honour: a 400 naming each."""
    if not body.add_generation_prompt:
        _unsupported("add_generation_prompt", "only true (the chat route's rendering) is")
    if body.continue_final_message:
        _unsupported("continue_final_message", "only false is")
    if body.chat_template is not None:
        _unsupported("chat_template", "the model's configured template is used; none other is")
    if body.mm_processor_kwargs:
        _unsupported("mm_processor_kwargs", "models read text only; no processor arguments are")


def _unsupported(param: str, what: str) -> None:
    raise APIError(400, f"'{param}' is not supported by hearth: {what} accepted.", param=param)


def _encode_prompt(engine: EngineClient, text: str, special_tokens: bool) -> list[int]:
    ids = engine.encode(text)
    if special_tokens:
        return ids
    prefix, suffix = _special_ends(engine)
    end = len(ids) - len(suffix)
    if ids[: len(prefix)] != prefix or ids[end:] != suffix or end < len(prefix):
        raise _no_special_split()
    return ids[len(prefix) : end]


def _special_ends(engine: EngineClient) -> tuple[list[int], list[int]]:
    """The tokens `encode` adds before and after any text (e.g. ([BOS], [])).

    `encode("")` is prefix + suffix; a probe's own tokens sit between them, which says where the
    prefix ends.
    """
    empty = engine.encode("")
    probe = engine.encode(_PROBE)
    if len(probe) <= len(empty):
        raise _no_special_split()
    for k in range(len(empty), -1, -1):
        prefix, suffix = empty[:k], empty[k:]
        if probe[:k] == prefix and probe[len(probe) - len(suffix) :] == suffix:
            return prefix, suffix
    raise _no_special_split()


def _no_special_split() -> APIError:
    return APIError(
        400,
        "This model's tokenizer does not add its special tokens as a fixed prefix and suffix, "
        "so hearth cannot serve this add_special_tokens value.",
        param="add_special_tokens",
    )
